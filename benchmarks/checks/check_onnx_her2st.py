"""HER2+ check of the ONNX Runtime encoder backends against torch's features (DenseNet-121, 910 spots).

Reads the five sections of patient C, embeds them again through ``agl.pp.embed_patches(backend="onnx")`` and
compares with torch features of the same encoder and patches (a cached h5ad with ``.obsm["X_agl_densenet121"]`` made by the torch backend, or embedded here):

- cosine similarity per spot with the torch features (min, median, share >= 0.999);
- leave-one-section-out PCA+Ridge (``agl.tl`` baseline: z-scored features, PCA 256, ridge with LOO alpha; top-50
  HVG targets of the training sections, log1p counts): mean target PCC from each backend's features, the
  difference to torch's, and the cross case (fitted on torch features, predicting from the backend's features;
  and fitted on the backend's, predicting from torch's), with the largest change of a prediction.

Usage::

    python -m benchmarks.checks.check_onnx_her2st [--torch-h5ad ../cache/her2st_densenet121.h5ad]
        [--data ../shared/data/her2st] [--weights <densenet .pth>] [--features onnx_features.npz]
        [--out benchmarks/results/onnx_her2st.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks._common import DENSENET_WEIGHTS, HER2ST, HER2ST_H5AD, RESULTS, command, git_state

KEY = "X_agl_densenet121"
PATCH_UM, PATCH_PX = 160.0, 224


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def loso(adata, feats: dict[str, np.ndarray], torch_key: str = "torch") -> dict:
    """Leave-one-section-out PCA+Ridge mean target PCC per feature set, and torch <-> backend cross predictions."""
    from agl_scverse._expression import expression_transform
    from agl_scverse._stats import pearson_per_gene
    from agl_scverse.pp import gene_roles
    from agl_scverse.tl._baselines import pca_ridge

    lib = adata.obs["library_id"].astype(str).to_numpy()
    out: dict = {name: {} for name in feats}
    for name in feats:
        if name != torch_key:
            out[f"{name} (fit torch, predict {name})"] = {}
            out[f"{name} (fit {name}, predict torch)"] = {}
            out[f"{name} max |pred change|"] = {}
    for sec in sorted(set(lib)):
        train, test = lib != sec, lib == sec
        roles = gene_roles(adata, n_targets=50, train_mask=train, inplace=False)
        cols = adata.var_names.get_indexer(roles.targets)
        Y = expression_transform(adata.X, "log1p", columns=cols)
        ref = pca_ridge(feats[torch_key][train], Y[train], feats[torch_key][test])
        for name, F in feats.items():
            pred = pca_ridge(F[train], Y[train], F[test])
            out[name][sec] = float(np.nanmean(pearson_per_gene(Y[test], pred)))
            if name == torch_key:
                continue
            cross = pca_ridge(feats[torch_key][train], Y[train], F[test])
            back = pca_ridge(F[train], Y[train], feats[torch_key][test])
            out[f"{name} (fit torch, predict {name})"][sec] = float(np.nanmean(pearson_per_gene(Y[test], cross)))
            out[f"{name} (fit {name}, predict torch)"][sec] = float(np.nanmean(pearson_per_gene(Y[test], back)))
            out[f"{name} max |pred change|"][sec] = float(np.abs(cross - ref).max())
    for v in out.values():
        v["mean"] = float(np.mean([v[s] for s in sorted(set(lib))]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-h5ad", type=Path, default=HER2ST_H5AD)
    ap.add_argument("--data", type=Path, default=HER2ST)
    ap.add_argument("--weights", type=Path, default=DENSENET_WEIGHTS)
    ap.add_argument("--features", type=Path, default=None, help="also save the ONNX features here (.npz)")
    ap.add_argument("--out", type=Path, default=RESULTS / "onnx_her2st.json")
    args = ap.parse_args()

    import anndata as ad
    import torch

    import agl_scverse as agl

    adata = agl.io.read_legacy_st(args.data)
    enc = agl.EncoderConfig("densenet121", weights=args.weights, patch_px=PATCH_PX, patch_um=PATCH_UM)
    kw = {"library_key": "library_id", "device": "cpu"}
    timings, records = {}, {}
    if args.torch_h5ad.exists():
        cached = ad.read_h5ad(args.torch_h5ad)
        if list(cached.obs_names) != list(adata.obs_names):
            sys.exit(f"{args.torch_h5ad} holds other spots than {args.data}")
        rec = dict(cached.uns["agl_embeddings"][KEY])
        if rec.get("backend", "torch") != "torch" or float(rec["patch_um"]) != PATCH_UM:
            sys.exit(f"{args.torch_h5ad} is not a torch embedding at {PATCH_UM} µm")
        feats = {"torch": np.asarray(cached.obsm[KEY], dtype=np.float32)}
        records["torch"] = {k: rec.get(k) for k in ("precision", "channels_last", "backend", "weights_sha256")}
    else:
        t0 = time.perf_counter()
        agl.pp.embed_patches(adata, replace(enc, backend="torch"), **kw, key_added="torch")
        timings["torch"] = time.perf_counter() - t0
        feats = {"torch": adata.obsm["torch"]}
    backends = ["onnx"]
    for b in backends:
        t0 = time.perf_counter()
        agl.pp.embed_patches(adata, replace(enc, backend=b), **kw, key_added=b)
        timings[b] = time.perf_counter() - t0
        feats[b] = np.asarray(adata.obsm[b])
        rec = adata.uns["agl_embeddings"][b]
        records[b] = {k: rec.get(k) for k in ("backend", "onnx_check_cosine", "onnx_threads", "onnxruntime")}
        print(f"{b}: embedded {adata.n_obs} spots in {timings[b]:.0f} s (read + cut + forward)")
    if args.features is not None:
        np.savez(args.features, obs_names=np.asarray(adata.obs_names), **{b: feats[b] for b in backends})
    cos = {}
    for b in backends:
        c = cosine(feats["torch"], feats[b])
        cos[b] = {"min": float(c.min()), "median": float(np.median(c)), "share_ge_0.999": float((c >= 0.999).mean())}
        print(f"{b}: cosine with torch per spot: min {c.min():.6f}, median {np.median(c):.6f}")
    pcc = loso(adata, feats)
    for name, v in pcc.items():
        what = "mean over folds" if "max" in name else "LOSO PCA+Ridge mean target PCC"
        print(f"{name}: {what} {v['mean']:.4g}")
    diffs = {b: pcc[b]["mean"] - pcc["torch"]["mean"] for b in backends}
    res = {
        "command": command(),
        "git": git_state(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(),
        },
        "n_spots": int(adata.n_obs),
        "records": records,
        "embed_seconds": timings,
        "cosine_vs_torch": cos,
        "loso_pca_ridge_pcc": pcc,
        "pcc_minus_torch": diffs,
        "within_0.002": {b: abs(d) <= 0.002 for b, d in diffs.items()},
        "within_0.005": {b: abs(d) <= 0.005 for b, d in diffs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({"pcc_minus_torch": diffs, "cosine_vs_torch": cos}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
