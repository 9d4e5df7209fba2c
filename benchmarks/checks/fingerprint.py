"""Fingerprint of fits on a small synthetic slide, to compare two versions of the code (refactors must match).

Embeds a 196-spot synthetic slide (random ResNet-18, 32 px), fits PGL, AGL-all, top-k (50) and DkGSB for 6
epochs on 80% of the spots (CPU, 2 threads) and a 1-epoch fine-tune AGL fit on 80 spots, predicts and evaluates,
and prints a JSON of hashes of the embedding, predictions, weights and roles with k, validation and held-out PCC.
Run it on two checkouts (``PYTHONPATH=<checkout>/src python -m benchmarks.checks.fingerprint > a.json``, from the
repository root) and diff.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings

import numpy as np
import torch

import agl_scverse as agl


def _h(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)  # no options: --help only
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("error", ".*deprecated and will be removed", FutureWarning)  # no old spellings here
    torch.set_num_threads(2)
    out: dict = {}
    a = agl.datasets.synthetic_slide(seed=1, n_rows=14, n_cols=14, n_informative=150, n_noise=400, n_bursty_noise=50)
    agl.pp.embed_patches(a, agl.EncoderConfig("resnet18", patch_px=32), device="cpu")
    out["emb"] = _h(a.obsm["X_agl_resnet18"])
    for method, kw in (("pgl", {}), ("agl", {}), ("topk", {"dkgsb": agl.DkGSBConfig(k=50)}), ("dkgsb", {})):
        b = a.copy()
        model = agl.tl.agl_fit(
            b,
            method=method,
            training=agl.TrainingConfig(epochs=6),
            progress=False,
            device="cpu",
            spots=np.arange(b.n_obs) % 5 != 0,
            **kw,
        )
        res = agl.tl.agl_predict(b, model, copy=True)
        agl.tl.evaluate(res, model)
        m = res.uns["agl"]["metrics"]
        out[method] = {
            "pred": _h(np.nan_to_num(np.asarray(res.layers["agl_pred"]), nan=-9)),
            "k": int(model.k),
            "val_pcc": float(m["val_pcc"]),
            "test": float(m["test"]["model"]["pearson"]),
            "ridge": float(m["test"]["pca_ridge"]["pearson"]),
            "weights": _h(np.asarray(b.var["agl_weight"], dtype=np.float64)),
            "roles": _h(np.frombuffer("".join(b.var["agl_role"].astype(str)).encode(), dtype=np.uint8)),
        }
    c = agl.datasets.synthetic_slide(seed=2)[:80].copy()
    model = agl.tl.agl_fit(
        c, method="agl", mode="finetune", encoder=agl.EncoderConfig("resnet18", patch_px=32),
        training=agl.TrainingConfig(epochs=1, batch_size=16), genes=agl.GeneConfig(n_targets=10), progress=False,
        device="cpu",
    )  # fmt: skip
    out["finetune"] = _h(np.nan_to_num(np.asarray(agl.tl.agl_predict(c, model, copy=True).layers["agl_pred"]), nan=-9))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
