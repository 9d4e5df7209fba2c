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
from agl_scverse.model._resume import CHECKPOINT_FILES, checkpoint_path

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
