"""HER2+ leave-one-section-out benchmark: mean, PCA+Ridge, PGL, AGL-all, top-k and DkGSB on DenseNet-121 features.

Reads the five HER2+ sections (patient C) with :func:`agl_scverse.io.read_legacy_st`, embeds 224-px patches of
160 µm (about the native 0.71-0.74 µm/px of these scans) with ImageNet DenseNet-121
(:func:`agl_scverse.pp.embed_patches`, local weights), caches the embedded AnnData under ``benchmarks/out/``, then
runs :func:`agl_scverse.tl.cross_validate` (targets = top-50 HVG of the four training sections, log1p counts,
validation = the next section) and reports per method: mean target Pearson r over sections, per-section means,
DkGSB's learned k per fold, and fit wall time as a ratio to AGL-all (median over folds).

Run::

    python benchmarks/bench_her2st_loso.py [--data ../shared/data/her2st] [--weights ../shared/weights/...pth]
        [--methods pgl agl topk dkgsb] [--epochs N] [--topk-k 1000]

Writes ``benchmarks/results/her2st_loso.json`` and ``.csv`` (per fold x method) and prints a Markdown table for
``benchmarks/RESULTS.md``.
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
ANCHORS = {"pca_ridge": 0.161, "pgl": 0.161, "agl": 0.167, "dkgsb": 0.167}
LABELS = {
    "mean": "mean predictor",
    "pca_ridge": "PCA+Ridge",
    "pgl": "PGL",
    "agl": "AGL-all",
    "topk": "top-k",
    "dkgsb": "DkGSB",
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


def summarise(df: pd.DataFrame, uns: dict) -> dict:
    """Per-method mean PCC over sections, per-section PCC, k per fold, fit time ratio to AGL-all."""
    summ = pd.DataFrame(uns["summary"])
    fold_pcc = summ.pivot(index="method", columns="fold", values="mean_pearson")
    methods = [m for m in LABELS if m in fold_pcc.index]
    out = {"methods": {}}
    secs = summ.pivot(index="method", columns="fold", values="fit_seconds")
    ks = summ.pivot(index="method", columns="fold", values="k")
    ref = secs.loc["agl"] if "agl" in secs.index else None
    for m in methods:
        ratio = float(np.median(secs.loc[m] / ref)) if ref is not None else None
        out["methods"][m] = {
            "label": LABELS[m],
            "mean_pcc": float(fold_pcc.loc[m].mean()),
            "per_section_pcc": {str(f): float(v) for f, v in fold_pcc.loc[m].items()},
            "median_fit_seconds": float(np.median(secs.loc[m])),
            "fit_time_ratio_to_agl_all": ratio,
            "k_per_fold": {str(f): (None if np.isnan(v) else int(v)) for f, v in ks.loc[m].items()},
            "anchor": ANCHORS.get(m),
        }
    return out


def markdown(res: dict, cmd: str) -> str:
    sections = list(next(iter(res["methods"].values()))["per_section_pcc"])
    head = "| method | mean target PCC | " + " | ".join(sections) + " | k per fold | fit time / AGL-all | anchor |"
    lines = [head, "|" + "---|" * (len(sections) + 5)]
    for r in res["methods"].values():
        ks = list(r["k_per_fold"].values())
        k = "-" if all(v is None for v in ks) else ", ".join(str(v) for v in ks)
        ratio = "-" if r["fit_time_ratio_to_agl_all"] is None else f"{r['fit_time_ratio_to_agl_all']:.2f}"
        anchor = "-" if r["anchor"] is None else f"{r['anchor']:.3f}"
        per = " | ".join(f"{r['per_section_pcc'][s]:.3f}" for s in sections)
        lines.append(f"| {r['label']} | **{r['mean_pcc']:.3f}** | {per} | {k} | {ratio} | {anchor} |")
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
    p.add_argument("--methods", nargs="+", default=["pgl", "agl", "topk", "dkgsb"])
    p.add_argument("--n-targets", type=int, default=50)
    p.add_argument("--epochs", type=int, default=None, help="max epochs per fit (default: agl_fit's)")
    p.add_argument("--topk-k", type=int, default=1000, help="auxiliary genes used by top-k")
    p.add_argument("--patch-um", type=float, default=160.0)
    p.add_argument("--patch-px", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    git = git_state()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    adata = load_embedded(args.data, args.weights, args.cache, args.patch_um, args.patch_px)
    fit_kwargs = {}
    if args.epochs is not None:
        fit_kwargs["epochs"] = args.epochs
    if "topk" in args.methods:
        fit_kwargs["k"] = args.topk_k
    t0 = time.perf_counter()
    df = agl.tl.cross_validate(
        adata,
        "library_id",
        methods=tuple(args.methods),
        embedding_key=EMB_KEY,
        n_targets=args.n_targets,
        baselines=True,
        seed=args.seed,
        key_added="agl_cv",
        **fit_kwargs,
    )
    total = time.perf_counter() - t0
    res = summarise(df, adata.uns["agl_cv"])
    cmd = "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])
    res.update(
        {
            "command": cmd,
            "git": git,
            "started": started,
            "total_seconds": total,
            "n_spots": int(adata.n_obs),
            "n_genes": int(adata.n_vars),
            "embedding": {
                k: v
                for k, v in adata.uns["agl_embeddings"][EMB_KEY].items()
                if k in ("encoder", "weights_sha256", "patch_px", "patch_um", "feature_dim")
            },
            "fit_kwargs": dict(fit_kwargs.items()),
            "n_targets": args.n_targets,
            "seed": args.seed,
            "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
            "versions": {"agl_scverse": agl.__version__, "torch": torch.__version__},
        }
    )
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "her2st_loso.json").write_text(json.dumps(res, indent=2, default=str))
    pd.DataFrame(adata.uns["agl_cv"]["summary"]).to_csv(args.results / "her2st_loso.csv", index=False)
    print(markdown(res, cmd))
    print(f"total {total:.0f} s")


if __name__ == "__main__":
    main()
