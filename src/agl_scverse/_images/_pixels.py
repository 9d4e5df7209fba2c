"""Pixel values: the RGB shape rule, the value range of integer and float images, conversion to uint8 RGB."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["check_rgb_shape", "to_uint8_rgb", "value_scale"]


def check_rgb_shape(shape: Sequence[int], name: str = "image") -> None:
    """Raise a clear error unless ``shape`` is ``(H, W, 3)`` or ``(H, W, 4)``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
        raise ValueError(
            f"{name} is grayscale (shape {shape}); H&E models need an RGB image (H x W x 3). "
            "Convert it, e.g. np.stack([img] * 3, axis=-1), only if it really is a stained slide."
        )
    if len(shape) != 3 or shape[2] not in (3, 4):
        raise ValueError(f"{name} has shape {shape}; expected H x W x 3 (RGB).")


def value_scale(dtype: Any, lo: float, hi: float, name: str = "image") -> float:
    """The ``scale`` of :func:`to_uint8_rgb` for values in ``[lo, hi]``: floats 255 in [0, 1], 16-bit integers 1 / 257."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return 255.0 if hi <= 1.0 + 1e-6 else 1.0
    if dtype in (np.uint8, np.uint16) or not np.issubdtype(dtype, np.integer):
        return 1.0
    if lo < 0 or hi > 65535:
        raise ValueError(
            f"{name} is {dtype} with values in [{lo:g}, {hi:g}]: not an 8-bit (0..255) or 16-bit (0..65535) image, "
            "so its white is unknown. Convert it to uint8 or uint16 RGB (e.g. scaled by its own maximum) first."
        )
    return 1.0 if hi <= 255 else 1.0 / 257


def to_uint8_rgb(raw: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """``(h, w, c >= 3)`` pixels as contiguous uint8 RGB: 16-bit values ``round(v / 257)``, floats times ``scale``."""
    raw = np.asarray(raw)[..., :3]
    if raw.dtype == np.uint8:
        return np.ascontiguousarray(raw)
    if np.issubdtype(raw.dtype, np.floating):
        return np.clip(raw * scale, 0, 255).astype(np.uint8)
    if raw.dtype == np.uint16 or (np.issubdtype(raw.dtype, np.integer) and scale < 1.0):
        return ((np.clip(raw, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
    return np.clip(raw, 0, 255).astype(np.uint8)
