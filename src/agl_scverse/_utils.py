"""Small shared helpers: data coercion, devices, hashing, seeding."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData


def as_anndata(data: Any, table_key: str | None = None) -> AnnData:
    """Return an AnnData for ``data``: an AnnData as is, a SpatialData via :func:`agl_scverse.io.from_spatialdata`."""
    if isinstance(data, AnnData):
        return data
    try:
        from spatialdata import SpatialData
    except ImportError:  # pragma: no cover
        SpatialData = ()  # type: ignore[assignment]
    if isinstance(data, SpatialData):
        from .io import from_spatialdata

        return from_spatialdata(data, table_key=table_key)
    raise TypeError(f"Expected an AnnData or a SpatialData object, got {type(data).__name__}.")


def resolve_device(device: str = "auto"):
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (legacy global RNG, for third-party code that uses it)
    torch.manual_seed(seed)
