"""Paths shared by the benchmark scripts: the repository, its results folder and the data kept outside it.

Data live beside the repository, not in it: ``AGL_SHARED`` (default ``../shared`` next to the repository) holds the
HER2+ sections (``data/her2st``) and the encoder weights (``weights/``); ``AGL_CACHE`` (default ``../cache``)
holds embedded AnnData files that scripts reuse instead of embedding again.
"""

from __future__ import annotations

import os
from pathlib import Path

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
