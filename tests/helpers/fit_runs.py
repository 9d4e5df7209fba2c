"""Small ``agl_fit`` / ``embed_patches`` runs shared by the resume and distributed tests, in-process or as a child.

As a script (``python fit_runs.py <job> <out> [args]``, also under ``torchrun``) it runs one job and writes
:func:`summary` of the result to ``<out>`` (``<out>.rank<r>`` for every rank under torchrun):

- ``kill <out> <mode> <save_dir> <n>``: fit with ``checkpoint_every=1`` and SIGKILL itself right after the
  ``n``-th checkpoint is written (nothing is written to ``<out>``);
- ``fit <out> <mode> [<json kwargs>]``: fit and write the summary;
- ``embed <out>``: embed the tiny slide's patches and write the features;
- ``suite <out>``: ``embed``, then fine-tune AGL-all and DkGSB (one launch for the distributed tests).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import agl_scverse as agl
from agl_scverse import _distributed
from agl_scverse.model import register_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from builders import fit_args, small_slide

TINY = "test_tiny_conv"
PATCH_PX = 16


def register_tiny() -> None:
    """A 2-layer conv encoder (no batch norm, no dropout): fast, and deterministic per sample."""
    register_encoder(
        TINY,
        lambda: nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten()),
        overwrite=True,
    )  # fmt: skip


def tiny_image_slide():
    """36 spots with an H&E-like image (6 x 6 grid)."""
    return agl.datasets.synthetic_slide(
        n_rows=6, n_cols=6, n_tissue_genes=12, n_informative=10, n_noise=20, n_bursty_noise=2, seed=0
    )


def fit_kwargs(mode: str) -> dict:
    """The settings of a run: embedding mode on ``small_slide``'s X_emb, fine-tune mode with the tiny encoder."""
    common = {"method": "dkgsb", "n_targets": 4, "min_cells": 1, "progress": False, "seed": 3, "patience": 50}
    if mode == "embedding":
        return {**common, "embedding_key": "X_emb", "hidden": (16,), "dropout": 0.0, "epochs": 5, "batch_size": 32,
                "meta_batch_size": 32, "lr": 3e-3}  # fmt: skip
    return {**common, "mode": "finetune", "encoder": TINY, "patch_px": PATCH_PX, "epochs": 4, "batch_size": 8,
            "meta_batch_size": 8, "lr": 1e-3}  # fmt: skip


def slide_for(mode: str):
    return small_slide() if mode == "embedding" else tiny_image_slide()


def fit(mode: str, **kw):
    """``(adata, model)`` of one run."""
    register_tiny()
    adata = slide_for(mode)
    model = agl.tl.agl_fit(adata, **fit_args(**{**fit_kwargs(mode), **kw}))
    return adata, model


def summary(adata, model) -> dict:
    """What two runs must agree on: weights, theta, mask weights, history (no timings), predictions."""
    hist = {k: np.asarray(v) for k, v in adata.uns["agl"]["history"].items() if k != "seconds"}
    pred = agl.tl.agl_predict(adata, model, copy=True).layers["agl_pred"]
    return {
        "state": {k: v.detach().clone() for k, v in model.net.state_dict().items()},
        "theta": model.config.get("theta"),
        "weights": np.asarray(model.weights),
        "history": hist,
        "pred": np.asarray(pred.toarray() if hasattr(pred, "toarray") else pred),
    }


def assert_identical(a: dict, b: dict) -> None:
    """Bit-identical summaries."""
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["theta"] == b["theta"] or (a["theta"] is None and b["theta"] is None)
    np.testing.assert_array_equal(a["weights"], b["weights"])
    assert a["history"].keys() == b["history"].keys()
    for k in a["history"]:
        np.testing.assert_array_equal(a["history"][k], b["history"][k], err_msg=k)
    np.testing.assert_array_equal(a["pred"], b["pred"])


def embed() -> dict:
    """Features of the tiny slide's patches (tiny encoder, batches of 5)."""
    register_tiny()
    adata = tiny_image_slide()
    agl.pp.embed_patches(adata, encoder=TINY, patch_px=PATCH_PX, batch_size=5, key_added="X_tiny")
    return {"features": adata.obsm["X_tiny"], "record": dict(adata.uns["agl_embeddings"]["X_tiny"])}


def _kill_after(n: int) -> None:
    from agl_scverse.model import _resume

    real = _resume.Checkpointer.save

    def save(self, state):
        real(self, state)
        if self.written >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    _resume.Checkpointer.save = save


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    job, out = argv[0], Path(argv[1])
    rank = int(os.environ.get("RANK", "0"))
    if job == "kill":
        mode, save_dir, n = argv[2], argv[3], int(argv[4])
        _kill_after(n)
        fit(mode, save_dir=save_dir, checkpoint_every=1)
        raise SystemExit("the run was not killed")
    if job == "fit":
        mode = argv[2]
        kw = json.loads(argv[3]) if len(argv) > 3 else {}
        adata, model = fit(mode, **kw)
        result = summary(adata, model)
    elif job == "embed":
        result = embed()
    elif job == "suite":  # one launch for the distributed tests: embedding, AGL-all and DkGSB fine-tuning
        result = {"embed": embed(), "agl": summary(*fit("finetune", method="agl")), "dkgsb": summary(*fit("finetune"))}
        result["world_size"] = _distributed.world_size()
    else:
        raise SystemExit(f"unknown job {job!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.save(result, out.with_name(out.name + f".rank{rank}") if world > 1 else out)


if __name__ == "__main__":
    main(sys.argv[1:])
