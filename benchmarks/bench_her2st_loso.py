"""HER2+ leave-one-section-out benchmark over seeds: baselines, PGL (plain and regularised), AGL-all, top-k, DkGSB.

Reads the five HER2+ sections (patient C) with :func:`agl_scverse.io.read_legacy_st`, embeds 224-px patches of
160 µm (about the native 0.71-0.74 µm/px of these scans) with ImageNet DenseNet-121
(:func:`agl_scverse.pp.embed_patches`, local weights), caches the embedded AnnData under ``benchmarks/out/``, then
runs :func:`agl_scverse.tl.cross_validate` once per seed (targets = top-50 HVG of the four training sections, log1p
counts, validation = the next section; every method and baseline trains on the same spots: with ``--refit`` (the
default) the networks are refitted on train + validation for their selected epochs and the baselines fit on the
same spots).

Methods: ``pgl``, ``pgl:reg`` (PGL with dropout 0.5: is an AGL gain just regularisation?), ``agl``, ``topk``
(``--topk-k``), ``topk:auto`` (k chosen on validation), ``dkgsb`` (defaults), ``dkgsb:legacy`` (the previous default:
SGD look-ahead, detached normaliser, beta 3e-3), plus the baselines ``pca_ridge`` and ``rrr`` (reduced-rank ridge
with auxiliaries). Reported: mean ± sd over seeds of the mean target PCC over sections, per-section means, k per
fold, fit time ratio to AGL-all, and paired differences (per seed) against PGL, regularised PGL and AGL-all.

Run::

    python benchmarks/bench_her2st_loso.py [--seeds 0 1 2 3 4] [--methods pgl pgl:reg agl topk:auto dkgsb]
        [--no-refit] [--data ../shared/data/her2st] [--weights ../shared/weights/...pth]

Writes ``benchmarks/results/her2st_loso.json`` and ``.csv`` (per seed x fold x method; rewritten after every seed)
and prints a Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import agl_scverse as agl
from agl_scverse._utils import sha256_file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LABELS = {
    "mean": "mean predictor",
    "pca_ridge": "PCA+Ridge (z-scored, LOO alpha)",
    "rrr": "reduced-rank ridge + auxiliaries",
    "pgl": "PGL",
    "pgl:reg": "PGL, dropout 0.5",
    "agl": "AGL-all",
    "topk": "top-k",
    "topk:auto": "top-k, k chosen on validation",
    "dkgsb": "DkGSB",
    "dkgsb:legacy": "DkGSB, previous default",
    "pgl:ens5": "PGL, 5-seed ensemble",
    "agl:ens5": "AGL-all, 5-seed ensemble",
    "dkgsb:ens5": "DkGSB, 5-seed ensemble",
    "topk:300": "top-300",
    "topk:1000": "top-1000",
    "topk:3000": "top-3000",
    "topk:rrr": "agl_fit(head='rrr', method='topk', k='auto')",
    "agl:hybrid": "AGL-all, agl_fit(head='hybrid')",
    "dkgsb:hybrid": "DkGSB, agl_fit(head='hybrid')",
}
VARIANTS = {
    "pgl:reg": {"dropout": 0.5},
    "topk:auto": {"k": "auto"},
    "dkgsb:legacy": {"meta_normalizer": "detached", "lookahead": "sgd", "beta": 3e-3},
    "pgl:ens5": {"n_seeds": 5},
    "agl:ens5": {"n_seeds": 5},
    "dkgsb:ens5": {"n_seeds": 5},
    "topk:300": {"k": 300},  # the top-k sweep (k = 0 is PGL, all is AGL-all)
    "topk:1000": {"k": 1000},
    "topk:3000": {"k": 3000},
    "topk:rrr": {"k": "auto", "head": "rrr"},  # the closed-form linear head as an agl_fit model
    "agl:hybrid": {"head": "hybrid"},  # the MLP ensemble with the linear head's targets averaged in
    "dkgsb:hybrid": {"head": "hybrid"},
}
EMB_KEY = "X_agl_densenet121"


def load_embedded(data: Path, weights: Path, cache: Path, patch_um: float, patch_px: int) -> agl.AnnData:  # type: ignore[name-defined]
    """Read the sections and embed them, or read the cached result (checked against the weights hash)."""
    import anndata as ad

    sha = sha256_file(weights)
    if cache.exists():
        adata = ad.read_h5ad(cache)
        rec = adata.uns.get("agl_embeddings", {}).get(EMB_KEY, {})
        if (
            EMB_KEY in adata.obsm
            and rec.get("weights_sha256") == sha
            and float(rec.get("patch_um", -1)) == patch_um
            and int(rec.get("patch_px", -1)) == patch_px
        ):
            print(f"cached embeddings: {cache}")
            return adata
        print("cache does not match the weights / patch settings: re-embedding")
    t0 = time.perf_counter()
    adata = agl.io.read_legacy_st(data)
    agl.pp.embed_patches(
        adata,
        encoder="densenet121",
        weights=weights,
        patch_px=patch_px,
        patch_um=patch_um,
        library_key="library_id",
        device="cpu",
    )
    print(f"read + embedded {adata.n_obs} spots in {time.perf_counter() - t0:.0f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(cache)
    return adata


def summarise(summ: pd.DataFrame) -> dict:
    """Per method: mean ± sd over seeds of the LOSO mean PCC, per-section means, k, time; paired differences."""
    per_seed = summ.groupby(["method", "seed"])["mean_pearson"].mean().unstack("seed")  # mean over folds
    secs = summ.groupby(["method", "fold"])["fit_seconds"].median().unstack("fold")
    out: dict = {"methods": {}, "paired": {}, "seeds": [int(v) for v in per_seed.columns]}
    for m in [m for m in LABELS if m in per_seed.index]:
        sec = summ[summ.method == m].groupby("fold")["mean_pearson"].mean()
        ks = summ[summ.method == m].groupby("fold")["k"].median()
        ratio = float(np.median(secs.loc[m] / secs.loc["agl"])) if "agl" in secs.index else None
        v = per_seed.loc[m].to_numpy(dtype=float)
        out["methods"][m] = {
            "label": LABELS[m],
            "mean_pcc": float(np.mean(v)),
            "sd_pcc": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"),
            "per_seed_pcc": [float(x) for x in v],
            "per_section_pcc": {str(f): float(x) for f, x in sec.items()},
            "median_k_per_fold": {str(f): (None if np.isnan(x) else int(x)) for f, x in ks.items()},
            "median_fit_seconds": float(np.median(secs.loc[m])),
            "fit_time_ratio_to_agl_all": ratio,
        }
    for ref in ("pgl", "pgl:reg", "agl"):
        if ref not in per_seed.index:
            continue
        for m in per_seed.index:
            if m == ref or m == "mean":
                continue
            d = (per_seed.loc[m] - per_seed.loc[ref]).to_numpy(dtype=float)
            out["paired"][f"{m} - {ref}"] = {
                "mean": float(np.mean(d)), "sd": float(np.std(d, ddof=1)) if len(d) > 1 else float("nan"),
                "wins": int((d > 0).sum()), "n": len(d),
            }  # fmt: skip
    return out


def markdown(res: dict, cmd: str) -> str:
    sections = list(next(iter(res["methods"].values()))["per_section_pcc"])
    n = len(res["seeds"])
    head = (
        f"| method | mean target PCC (± sd, {n} seeds) | "
        + " | ".join(sections)
        + " | median k per fold | fit time / AGL-all |"
    )
    lines = [head, "|" + "---|" * (len(sections) + 4)]
    for r in res["methods"].values():
        ks = list(r["median_k_per_fold"].values())
        k = "-" if all(v is None for v in ks) else ", ".join(str(v) for v in ks)
        ratio = "-" if r["fit_time_ratio_to_agl_all"] is None else f"{r['fit_time_ratio_to_agl_all']:.2f}"
        per = " | ".join(f"{r['per_section_pcc'][s]:.3f}" for s in sections)
        lines.append(f"| {r['label']} | **{r['mean_pcc']:.3f}** ± {r['sd_pcc']:.3f} | {per} | {k} | {ratio} |")
    lines += ["", "| paired difference (per seed) | mean | sd | wins |", "|---|---|---|---|"]
    for name, d in res["paired"].items():
        lines.append(f"| {name} | {d['mean']:+.4f} | {d['sd']:.4f} | {d['wins']}/{d['n']} |")
    return "\n".join(lines) + f"\n\nCommand: `{cmd}`\n"


def git_state() -> str:
    """Commit of the repository and whether src/ had uncommitted edits when the run started."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return head.strip() + (" (src/ modified)" if dirty else "")
    except OSError:  # pragma: no cover
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "her2st")
    p.add_argument(
        "--weights", type=Path, default=SHARED / "weights" / "densenet121_keras_imagenet_features_torchvision.pth"
    )
    p.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "out" / "her2st_densenet121.h5ad")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--methods", nargs="+", default=["pgl", "pgl:reg", "agl", "topk:auto", "dkgsb"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--no-refit", action="store_true", help="networks train on the training split only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-seeds", type=int, default=None, help="networks per fit (default: agl_fit's, 5)")
    p.add_argument("--stem", default=None, help="results file name (default: her2st_loso[_norefit])")
    p.add_argument("--n-targets", type=int, default=50)
    p.add_argument("--prior", default="hvg", help="auxiliary ranking: hvg, coexpression, moran (default: hvg)")
    p.add_argument("--epochs", type=int, default=None, help="max epochs per fit (default: agl_fit's)")
    p.add_argument("--topk-k", type=int, default=1000, help="auxiliary genes used by top-k")
    p.add_argument("--patch-um", type=float, default=160.0)
    p.add_argument("--patch-px", type=int, default=224)
    args = p.parse_args()

    import torch

    git = git_state()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    torch.set_num_threads(args.threads)
    adata = load_embedded(args.data, args.weights, args.cache, args.patch_um, args.patch_px)
    fit_kwargs = {"refit": not args.no_refit}
    if args.n_seeds is not None:
        fit_kwargs["n_seeds"] = args.n_seeds
    if args.epochs is not None:
        fit_kwargs["epochs"] = args.epochs
    if "topk" in args.methods:
        fit_kwargs["k"] = args.topk_k
    cmd = "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])
    args.results.mkdir(parents=True, exist_ok=True)
    frames = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        ts = time.perf_counter()
        agl.tl.cross_validate(
            adata, "library_id", methods=tuple(args.methods), embedding_key=EMB_KEY, n_targets=args.n_targets,
            prior=args.prior, baselines=True, seed=seed, key_added="agl_cv", progress=False,
            method_kwargs={m: VARIANTS[m] for m in args.methods if m in VARIANTS}, **fit_kwargs,
        )  # fmt: skip
        summ = pd.DataFrame(adata.uns["agl_cv"]["summary"])
        summ["seed"] = seed
        frames.append(summ)
        print(
            f"seed {seed}: {time.perf_counter() - ts:.0f} s; "
            + ", ".join(f"{m} {v:.3f}" for m, v in summ.groupby("method", sort=False)["mean_pearson"].mean().items())
        )
        all_summ = pd.concat(frames, ignore_index=True)
        res = summarise(all_summ)
        res.update(
            {
                "command": cmd, "git": git, "started": started, "total_seconds": time.perf_counter() - t0,
                "n_spots": int(adata.n_obs), "n_genes": int(adata.n_vars),
                "embedding": {
                    k: v for k, v in adata.uns["agl_embeddings"][EMB_KEY].items()
                    if k in ("encoder", "weights_sha256", "patch_px", "patch_um", "feature_dim")
                },
                "fit_kwargs": {k: str(v) for k, v in fit_kwargs.items()}, "variants": VARIANTS,
                "n_targets": args.n_targets, "prior": args.prior,
                "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
                "versions": {"agl_scverse": agl.__version__, "torch": torch.__version__},
            }
        )  # fmt: skip
        stem = args.stem or "her2st_loso" + ("_norefit" if args.no_refit else "")
        (args.results / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
        all_summ.to_csv(args.results / f"{stem}.csv", index=False)
    print(markdown(res, cmd))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
