"""Checkpoint and resume: a run SIGKILLed after a checkpoint and resumed ends bit-identical to an uninterrupted one.

The killed run is a child process (``tests/helpers/fit_runs.py kill``) that kills itself right after its second
checkpoint is complete; the resumed and the uninterrupted runs are in this process (one torch thread, see
``tests/conftest.py``; the child uses one too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fit_runs import assert_identical, fit, summary

import agl_scverse as agl
from agl_scverse.model import AGLModel
from agl_scverse.train._resume import CHECKPOINT_FILES, checkpoint_path

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
SRC = Path(agl.__file__).resolve().parents[1]


def _killed_run(mode: str, save_dir: Path, n: int = 2) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HELPERS)]), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, str(HELPERS / "fit_runs.py"), "kill", "unused", mode, str(save_dir), str(n)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _check_killed_state(save_dir: Path, epochs_done: int) -> None:
    ckpt = checkpoint_path(save_dir)
    assert not save_dir.exists()  # the model is written at the end only
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(CHECKPOINT_FILES)
    assert json.loads((ckpt / "checkpoint.json").read_text())["epoch"] == epochs_done
    assert sorted(p.name for p in save_dir.parent.iterdir()) == [ckpt.name]  # no temporaries left behind


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("mode", ["embedding", pytest.param("finetune", marks=pytest.mark.slow)])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, mode):
    save_dir = tmp_path / "run" / "model"
    _killed_run(mode, save_dir)
    _check_killed_state(save_dir, 2)
    adata, model = fit(mode, save_dir=save_dir, checkpoint_every=1, resume=True)
    resumed = summary(adata, model)
    assert not checkpoint_path(save_dir).exists()  # removed once the model is saved
    assert sorted(p.name for p in save_dir.iterdir()) == ["config.json", "model.safetensors"]
    ref_adata, ref_model = fit(mode)
    reference = summary(ref_adata, ref_model)
    assert_identical(resumed, reference)
    assert resumed["theta"] is not None and len(resumed["history"]["epoch"]) == (5 if mode == "embedding" else 4)
    # the saved model is the returned one
    loaded = AGLModel.load(save_dir)
    assert_identical(summary(adata, loaded), resumed)


def _embedding_run(save_dir: Path, **kw):
    """A 2-epoch embedding run that leaves a checkpoint after epoch 1 (as if it had been killed in epoch 2)."""
    from agl_scverse.train import _resume

    real, done = _resume.Checkpointer.remove, []
    _resume.Checkpointer.remove = lambda self: done.append(self.path)  # keep the checkpoint
    try:
        return fit("embedding", save_dir=save_dir, checkpoint_every=1, epochs=2, overwrite=True, **kw)
    finally:
        _resume.Checkpointer.remove = real


def test_resume_refuses_a_differently_configured_run_and_an_unasked_overwrite(tmp_path):
    save_dir = tmp_path / "m"
    _embedding_run(save_dir)
    ckpt = checkpoint_path(save_dir)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    import shutil

    shutil.rmtree(save_dir)  # as if killed before the model was written
    with pytest.raises(ValueError, match=r"other settings or data \(params.lr: checkpoint 0.003, now 0.01"):
        fit("embedding", save_dir=save_dir, checkpoint_every=1, epochs=2, resume=True, lr=1e-2)
    with pytest.raises(FileExistsError, match="pass resume=True to continue it"):
        fit("embedding", save_dir=save_dir, checkpoint_every=1, epochs=2)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before and not save_dir.exists()
    # a damaged state file is named, not loaded
    (ckpt / "state.pt").write_bytes(before["state.pt"][:-10])
    with pytest.raises(ValueError, match="state.pt is damaged"):
        fit("embedding", save_dir=save_dir, epochs=2, resume=True)


def test_checkpoint_settings_are_checked_and_a_foreign_folder_is_not_overwritten(tmp_path):
    with pytest.raises(ValueError, match="need save_dir"):
        fit("embedding", checkpoint_every=1)
    with pytest.raises(ValueError, match="checkpoint_every"):
        fit("embedding", save_dir=tmp_path / "m", checkpoint_every=-1)
    foreign = checkpoint_path(tmp_path / "m")
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an AGL training checkpoint"):
        fit("embedding", save_dir=tmp_path / "m", checkpoint_every=1, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_resume_without_a_checkpoint_trains_from_the_start(tmp_path):
    adata, model = fit("embedding", save_dir=tmp_path / "m", resume=True, epochs=2)
    ref = fit("embedding", epochs=2)
    assert_identical(summary(adata, model), summary(*ref))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_resume_refuses_another_meta_scope(tmp_path):
    # the DkGSB look-ahead's scope is part of the run's fingerprint ("auto" resolves to "all" in embedding mode)
    save_dir = tmp_path / "m"
    _embedding_run(save_dir, hidden=(16, 8))
    import shutil

    shutil.rmtree(save_dir)
    with pytest.raises(ValueError, match=r"params.meta_scope: checkpoint 'all', now 'last'"):
        fit("embedding", save_dir=save_dir, checkpoint_every=1, epochs=2, resume=True, hidden=(16, 8),
            meta_scope="last")  # fmt: skip
    adata, _ = fit("embedding", save_dir=save_dir, checkpoint_every=1, epochs=2, resume=True, hidden=(16, 8))
    assert adata.uns["agl"]["params"]["meta_scope"] == "all"


def test_checkpoint_state_carries_the_gradient_scaler():
    # fp16 (CUDA) trains through a GradScaler; its loss scale and growth counter are part of the resumed state
    import numpy as np
    import torch

    from agl_scverse.train._resume import rng_state
    from agl_scverse.train._trainer import _loop_state, _restore_loop_state, empty_history

    class Ckpt:
        def __init__(self, state):
            self.state = state

        def rank_rng(self):
            return rng_state()

    net, rng = torch.nn.Linear(3, 2), np.random.default_rng(0)
    opt = torch.optim.Adam(net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7, growth_interval=3)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(2.0**5)
    best = (0.1, 0, None, None)
    st = _loop_state(2, net, opt, None, None, rng, empty_history(), best, 0, 0.0, 1.0, scaler)
    assert st["scaler"]["scale"] == 2.0**5
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    epoch, *_ = _restore_loop_state(Ckpt(st), net, opt, None, None, rng, empty_history(), 0.0, fresh)
    assert epoch == 2 and fresh.get_scale() == 2.0**5
    assert _loop_state(2, net, opt, None, None, rng, empty_history(), best, 0, 0.0, 1.0)["scaler"] is None


def test_resume_refuses_shuffled_counts_of_the_training_spots(tmp_path, monkeypatch):
    """Same genes, embedding and split, but the count rows shuffled among the train/validation spots: the
    checkpoint's fingerprint of the training data differs, so resuming is refused naming it."""
    import numpy as np
    from builders import small_slide
    from fit_runs import fit_kwargs

    from agl_scverse.train import _resume

    monkeypatch.setattr(_resume.Checkpointer, "remove", lambda self: None)  # keep the checkpoint (as if killed)
    save_dir = tmp_path / "m"
    kw = {**fit_kwargs("embedding"), "epochs": 2, "checkpoint_every": 1, "save_dir": save_dir}
    adata = small_slide()
    agl.tl.agl_fit(adata, **kw, overwrite=True)
    import shutil

    shutil.rmtree(save_dir)
    used = np.flatnonzero(adata.obs["agl_split"].isin(["train", "val"]).to_numpy())
    shuffled = small_slide()
    perm = np.random.default_rng(0).permutation(used)
    shuffled.X[used] = shuffled.X[perm]
    with pytest.raises(ValueError, match=r"other settings or data \(expression_sha256: checkpoint"):
        agl.tl.agl_fit(shuffled, **kw, resume=True)
    assert not save_dir.exists()
    agl.tl.agl_fit(small_slide(), **kw, resume=True)  # the same data resumes
    assert save_dir.is_dir()
