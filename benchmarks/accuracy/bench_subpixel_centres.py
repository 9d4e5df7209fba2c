"""How much sub-pixel spot centres move HER2+ predictions: float, rounded and truncated centres of section C6.

The cached HER2+ embedding (``../cache/her2st_densenet121.h5ad``, ``$AGL_CACHE`` or ``--cache``; DenseNet-121 ImageNet weights,
160 µm in 224 px) was cut by the earlier rule, which rounds each float centre to the nearest pixel: it is the
"rounded" variant. This script embeds C6 again with the current code from its float centres (sub-pixel: the
window shifted by the fraction, resized in one antialiased pass) and from truncated integer centres (``int()``, what a reader that
stores integers gives), fits PCA + Ridge on C2-C5 (cached embedding, top-50 HVG of C2-C5, log1p counts) and
predicts C6 from each. Prints, per pair, the largest per-spot change of a prediction and the mean target PCC,
and writes ``benchmarks/results/subpixel_centres.json``.

    python -m benchmarks.accuracy.bench_subpixel_centres --data ../shared/data/her2st \\
        --weights ../shared/weights/densenet121_keras_imagenet_features_torchvision.pth
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np

import agl_scverse as agl
from agl_scverse._expression import expression_transform
from agl_scverse._stats import pearson_per_gene
from agl_scverse.tl import pca_ridge
from benchmarks._common import HER2ST_H5AD, RESULTS

EMB = "X_agl_densenet121"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/data/her2st"))
    p.add_argument(
        "--weights", type=Path, default=Path("../shared/weights/densenet121_keras_imagenet_features_torchvision.pth")
    )
    p.add_argument("--cache", type=Path, default=HER2ST_H5AD)
    p.add_argument("--section", default="C6")
    p.add_argument("--out", type=Path, default=RESULTS / "subpixel_centres.json")
    args = p.parse_args()
    import torch

    torch.set_num_threads(2)
    cached = ad.read_h5ad(args.cache)
    lib = cached.obs["library_id"].astype(str).to_numpy()
    test = lib == args.section
    roles = agl.pp.gene_roles(cached, n_targets=50, train_mask=~test, inplace=False)
    cols = cached.var_names.get_indexer(roles.targets)
    Y = expression_transform(cached.X, "log1p", columns=cols)
    X = np.asarray(cached.obsm[EMB], dtype=np.float32)

    section = agl.io.read_legacy_st(args.data, sections=[args.section])
    pos = section.obs_names.get_indexer(cached.obs_names[test])
    assert (pos >= 0).all()
    xy = np.asarray(section.obsm["spatial"], dtype=float)
    frac = np.abs(xy - np.round(xy))
    feats = {"rounded (earlier rule)": X[test]}
    seconds = {}
    for name, centres in (("float (sub-pixel)", xy), ("truncated int", np.trunc(xy))):
        s = section.copy()
        s.obsm["spatial"] = centres
        t0 = time.perf_counter()
        enc = agl.EncoderConfig("densenet121", weights=args.weights, patch_px=224, patch_um=160.0)
        agl.pp.embed_patches(s, enc, device="cpu", progress=False)
        seconds[name] = time.perf_counter() - t0
        feats[name] = np.asarray(s.obsm[EMB], dtype=np.float32)[pos]
    preds = {k: pca_ridge(X[~test], Y[~test], f, seed=0) for k, f in feats.items()}
    pcc = {k: float(np.nanmean(pearson_per_gene(Y[test], v))) for k, v in preds.items()}
    pairs = [("float (sub-pixel)", "rounded (earlier rule)"), ("float (sub-pixel)", "truncated int"),
             ("rounded (earlier rule)", "truncated int")]  # fmt: skip
    out = {
        "section": args.section,
        "n_spots": int(test.sum()),
        "median_fraction_px": float(np.median(frac)),
        "mean_target_pcc": pcc,
        "max_abs_change": {f"{a} vs {b}": float(np.abs(preds[a] - preds[b]).max()) for a, b in pairs},
        "median_abs_change": {f"{a} vs {b}": float(np.median(np.abs(preds[a] - preds[b]))) for a, b in pairs},
        "embed_seconds": seconds,
    }
    print(json.dumps(out, indent=2))
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
