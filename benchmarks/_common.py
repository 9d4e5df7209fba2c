"""Paths shared by the benchmark scripts: the repository, its results folder and the data kept outside it.

Data live beside the repository, not in it: ``AGL_SHARED`` (default ``../shared`` next to the repository) holds the
HER2+ sections (``data/her2st``) and the encoder weights (``weights/``); ``AGL_CACHE`` (default ``../cache``)
holds embedded AnnData files that scripts reuse instead of embedding again.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np

#: the repository root (scripts run from here: ``python -m benchmarks.<kind>.<script>``)
REPO = Path(__file__).resolve().parents[1]
#: where every script writes its result files by default
RESULTS = REPO / "benchmarks" / "results"
#: scratch outputs of the scripts (embedded AnnData, saved models); ignored by git
OUT = REPO / "benchmarks" / "out"
#: data and weights that are not shipped: ``$AGL_SHARED`` or ``../shared`` beside the repository
SHARED = Path(os.environ.get("AGL_SHARED", REPO.parent / "shared"))
#: cached embeddings: ``$AGL_CACHE`` or ``../cache`` beside the repository
CACHE = Path(os.environ.get("AGL_CACHE", REPO.parent / "cache"))
#: the HER2+ sections of patient C (one folder per section: counts.tsv.gz, spots.tsv, he.jpg)
HER2ST = SHARED / "data" / "her2st"
#: file name of the local DenseNet-121 ImageNet weights (torchvision layout)
DENSENET_FILE = "densenet121_keras_imagenet_features_torchvision.pth"
DENSENET_WEIGHTS = SHARED / "weights" / DENSENET_FILE
#: the five HER2+ sections embedded with DenseNet-121 (224 px / 160 µm): ``.obsm["X_agl_densenet121"]``
HER2ST_H5AD = CACHE / "her2st_densenet121.h5ad"


def git_state() -> str:
    """Commit of the repository and whether ``src/`` had uncommitted edits when the run started."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return head.strip() + (" (src/ modified)" if dirty else "")
    except OSError:  # no git
        return "unknown"


def command() -> str:
    """This run's command line as typed from the repository root (``python -m benchmarks.<kind>.<script> ...``)."""
    script = Path(sys.argv[0]).resolve()
    try:
        name = "python -m " + ".".join(script.relative_to(REPO).with_suffix("").parts)
    except ValueError:
        name = "python " + sys.argv[0]
    return " ".join([name, *map(shlex.quote, sys.argv[1:])])


def pcc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean per-gene Pearson r; a constant prediction or truth scores 0 (as ``agl.tl.evaluate``)."""
    yc, pc = y - y.mean(0), p - p.mean(0)
    den = np.sqrt((yc**2).sum(0) * (pc**2).sum(0))
    r = np.where(den > 0, (yc * pc).sum(0) / np.where(den > 0, den, 1.0), 0.0)
    return float(r.mean())


def targets_on(adata: ad.AnnData, train: np.ndarray) -> list[str]:
    """The HER2+ protocol's targets: the top-50 HVG of the training spots (sections in ``.obs["library_id"]``)."""
    import agl_scverse as agl

    roles = agl.pp.gene_roles(adata, n_targets=50, train_mask=train, library_key="library_id", inplace=False)
    return list(roles.targets)


def expression(adata: ad.AnnData, genes: list[str]) -> np.ndarray:
    """log1p counts of ``genes`` as a dense float64 array (what the HER2+ protocol scores)."""
    X = adata[:, genes].X
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    return np.log1p(X.astype(np.float64))
