"""Small shared helpers: devices, hashing, seeding, package versions."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np


def resolve_device(device: str = "auto"):
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(device)`` (checked: known, available)."""
    import torch

    from agl_scverse._distributed import env_world_size, local_rank
    from agl_scverse._validate import check_device

    check_device(device)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and dev.index is None and env_world_size() > 1:
        dev = torch.device("cuda", local_rank())  # under torchrun: this process's GPU
    return dev


def show_progress(progress: bool | None) -> bool:
    """The one rule for progress bars: ``progress`` when given, else scanpy's verbosity decides."""
    if progress is not None:
        return bool(progress)
    import scanpy as sc  # a core dependency; imported here to keep `import agl_scverse` light

    return int(sc.settings.verbosity) >= 1


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_array(a, rows: int = 65536) -> str:
    """Hex sha256 of an array's dtype, shape and values (hashed in row blocks: no copy of the whole array)."""
    a = np.asarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    for s in range(0, max(len(a), 1), rows):
        h.update(np.ascontiguousarray(a[s : s + rows]).tobytes())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    seed = int(seed)  # NumPy integers too
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (legacy global RNG, for third-party code that uses it)
    torch.manual_seed(seed)


#: Packages whose versions shape a result, recorded in ``.uns`` params, embedding records and model configs.
VERSIONED_PACKAGES = ("agl-scverse", "torch", "torchvision", "timm", "numpy", "scipy", "anndata", "scanpy")


def versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONED_PACKAGES` (absent ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover
            continue
    return out
