"""HER2+ (patient C) leave-one-section-out: spatial context (agl.pp.spatial_context) chosen by nested validation.

Reads the cached DenseNet-121 embedding of the five sections (224 px / 160 µm patches, ImageNet weights; built by
``bench_her2st_loso.py``'s ``load_embedded``), builds every candidate context recipe with
:func:`agl_scverse.pp.spatial_context` (per section: no neighbour crosses sections, so a section's features never see
another section) and scores PCA(256)+Ridge (:func:`agl_scverse.tl.pca_ridge`, z-scored targets, LOO alpha) on the
top-50 HVG targets of the training sections (log1p counts).

Nested selection: for each test section T, every recipe is scored by an inner leave-one-section-out over the four
training sections (train on three, validate on the fourth; targets of the four); the recipe with the best inner
mean PCC is the one T is scored with ("nested"). The outer score of every recipe is printed too, for information
only: no choice uses it. ``--agl`` also runs ``agl_fit`` (DkGSB, refit, one seed) through
:func:`agl_scverse.tl.cross_validate`, one held-out section at a time, on the spot embedding and on the context
recipes named by ``--agl-recipes`` (default: the chosen default, ``concat_k12_std``); the JSON is rewritten after
every fit.

Run::

    python -m benchmarks.accuracy.bench_context_her2st [--data ../cache/her2st_densenet121.h5ad] [--agl]
        [--agl-recipes blend_k12 concat_k12] [--fov-key X_agl_densenet121_fov320um]

Writes ``benchmarks/results/context_her2st.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import agl_scverse as agl
from benchmarks._common import HER2ST_H5AD, RESULTS, command, expression, git_state, pcc, targets_on

BASE = "X_agl_densenet121"
#: Candidate recipes (spatial_context keyword arguments); "none" is the spot embedding alone.
B, C, M = {"output": "blend"}, {"output": "concat", "aggregation": "mean"}, {"aggregation": "mean"}
RECIPES: dict[str, dict | None] = {  # every recipe spells out output and aggregation (the defaults changed)
    "none": None,
    "blend_k4": {"n_neighs": 4, **B, **M},
    "blend_k6": {"n_neighs": 6, **B, **M},
    "blend_k12": {"n_neighs": 12, **B, **M},
    "blend_k18": {"n_neighs": 18, **B, **M},
    "blend_k24": {"n_neighs": 24, **B, **M},
    "blend_k12_a0.5": {"n_neighs": 12, "alpha": 0.5, **B, **M},
    "gauss_k12": {"n_neighs": 12, "aggregation": "gaussian", **B},
    "radius_300um": {"radius_um": 300.0, **B, **M},
    "radius_450um": {"radius_um": 450.0, **B, **M},
    "concat_k6": {"n_neighs": 6, **C},
    "concat_k12": {"n_neighs": 12, **C},
    "concat_k12_std": {"n_neighs": 12, "output": "concat", "aggregation": ("mean", "std")},
    "blend_k12_subtract": {"n_neighs": 12, "slide": "subtract", **B, **M},
    "concat_k12_slide": {"n_neighs": 12, "slide": "append", **C},
}
#: With a wider field of view (--fov-key): added to RECIPES.
FOV_RECIPES = {
    "concat_k12_fov": {"n_neighs": 12, **C},
    "concat_k12_std_fov": {"n_neighs": 12, "output": "concat", "aggregation": ("mean", "std")},
    "blend_k12_fov": {"n_neighs": 12, **B, **M},
}


def score(F: np.ndarray, Y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    return pcc(Y[test], agl.tl.pca_ridge(F[train], Y[train], F[test]))


def build_features(adata: ad.AnnData, fov_key: str | None, only: list[str] | None = None) -> dict[str, np.ndarray]:
    recipes = dict(RECIPES)
    if fov_key:
        um = float(adata.uns["agl_embeddings"][fov_key]["patch_um"])
        recipes.update({k: {**v, "fov_patch_um": um, "fov_key": fov_key} for k, v in FOV_RECIPES.items()})
        recipes["fov_only"] = "fov"
    if only:
        recipes = {k: v for k, v in recipes.items() if k in only}
    feats = {}
    for name, kw in recipes.items():
        if kw is None:
            feats[name] = np.asarray(adata.obsm[BASE], dtype=np.float32)
        elif kw == "fov":
            feats[name] = np.concatenate([adata.obsm[BASE], adata.obsm[fov_key]], axis=1).astype(np.float32)
        else:
            feats[name] = agl.pp.spatial_context(adata, BASE, **kw, key_added=f"ctx_{name}", copy=True).obsm[
                f"ctx_{name}"
            ]
    return feats


def nested(adata: ad.AnnData, feats: dict[str, np.ndarray]) -> dict:
    lib = adata.obs["library_id"].astype(str).to_numpy()
    sections = sorted(set(lib))
    rows, chosen = [], {}
    for test_sec in sections:
        train_secs = [s for s in sections if s != test_sec]
        train = np.isin(lib, train_secs)
        Y = expression(adata, targets_on(adata, train))
        inner = {}
        for name, F in feats.items():
            inner[name] = float(np.mean([score(F, Y, train & (lib != v), lib == v) for v in train_secs]))
            outer = score(F, Y, train, lib == test_sec)
            rows.append({"test": test_sec, "recipe": name, "inner": inner[name], "outer": outer})
        chosen[test_sec] = max(inner, key=inner.get)
        print(f"{test_sec}: chosen {chosen[test_sec]} (inner {inner[chosen[test_sec]]:.4f}, none "
              f"{inner['none']:.4f})", flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    outer = df.pivot(index="recipe", columns="test", values="outer")
    inner = df.pivot(index="recipe", columns="test", values="inner")
    nested_scores = {t: float(outer.loc[chosen[t], t]) for t in sections}
    return {"per_fold": rows, "chosen": chosen, "nested": nested_scores,
            "outer_mean": outer.mean(1).to_dict(), "inner_mean": inner.mean(1).to_dict(), "sections": sections}  # fmt: skip


def agl_runs(adata: ad.AnnData, recipes: list[str], res: dict, out: Path) -> dict:
    """DkGSB (agl_fit defaults but one seed) per held-out section, each recipe in turn; saved after every fit."""
    keys = {}
    for name in ["none", *recipes]:
        kw = RECIPES[name]
        keys[name] = BASE if kw is None else f"ctx_{name}"
        if kw is not None:
            agl.pp.spatial_context(adata, BASE, **kw, key_added=keys[name])
    runs = res.setdefault("agl_fit", {name: {"per_section": {}, "seconds": {}} for name in keys})
    for sec in sorted(adata.obs["library_id"].astype(str).unique()):
        for name, key in keys.items():
            t = time.perf_counter()
            df = agl.tl.cross_validate(adata, group_key="library_id", methods=["dkgsb"], embedding_key=key,
                                       groups=[sec], genes=agl.GeneConfig(n_targets=50), baselines=False,
                                       training=agl.TrainingConfig(n_seeds=1), progress=False, seed=0)  # fmt: skip
            runs[name]["per_section"][sec] = float(df[df.method == "dkgsb"].pearson.mean())
            runs[name]["seconds"][sec] = time.perf_counter() - t
            runs[name]["mean"] = float(np.mean(list(runs[name]["per_section"].values())))
            print(f"agl_fit dkgsb {sec} {name}: {runs[name]['per_section'][sec]:.4f}", flush=True)
            out.write_text(json.dumps(res, indent=1, default=float))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(HER2ST_H5AD))
    ap.add_argument("--fov-key", default=None, help="an .obsm key of a wider-patch embedding in --data")
    ap.add_argument("--fov-data", default=None, help="an h5ad holding --fov-key (same spots)")
    ap.add_argument("--agl", action="store_true")
    ap.add_argument("--agl-recipes", nargs="*", default=["concat_k12_std"])
    ap.add_argument("--agl-only", action="store_true", help="skip the PCA+Ridge nested selection")
    ap.add_argument("--recipes", nargs="*", default=None, help="candidate recipes (default: all)")
    ap.add_argument("--out", default=str(RESULTS / "context_her2st.json"))
    args = ap.parse_args()
    adata = ad.read_h5ad(args.data)
    if args.fov_data:
        fov = ad.read_h5ad(args.fov_data)
        adata.obsm[args.fov_key] = fov[adata.obs_names].obsm[args.fov_key]
        adata.uns["agl_embeddings"][args.fov_key] = fov.uns["agl_embeddings"][args.fov_key]
    res = {}
    if not args.agl_only:
        t0 = time.perf_counter()
        feats = build_features(adata, args.fov_key, args.recipes)
        res = nested(adata, feats)
        res["pca_ridge_seconds"] = time.perf_counter() - t0
        print("\n| recipe | inner LOSO (mean over folds) | outer LOSO (information only) |\n|---|---|---|")
        for name in feats:
            print(f"| {name} | {res['inner_mean'][name]:.4f} | {res['outer_mean'][name]:.4f} |")
        ns = res["nested"]
        print(f"\nnested PCA+Ridge: {np.mean(list(ns.values())):.4f} ({ {k: round(v, 3) for k, v in ns.items()} }); "
              f"spot embedding alone {res['outer_mean']['none']:.4f}")  # fmt: skip
    res["command"], res["git"] = command(), git_state()
    res["machine"] = platform.platform()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.agl:
        agl_runs(adata, args.agl_recipes, res, Path(args.out))
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
