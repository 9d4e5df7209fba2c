"""Cutting one patch: its origin and sub-pixel shift, padding at the border, resizing, memory limits."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agl_scverse._images import ImageSource, open_image
from agl_scverse._validate import check_choice

PAD_MODES = ("constant", "reflect", "edge")
ON_OUTSIDE = ("error", "pad")
#: Largest memory (bytes) cutting one patch may take (crop, padded copy, float32 resize, patch: :func:`patch_bytes`).
MAX_PATCH_BYTES = 2 * 2**30
#: Largest memory (bytes) of the patch batches held at once (uint8 batches in flight, float32 input and its
#: normalised copy, float32 batches made ahead), before the encoder's own activations.
MAX_BATCH_BYTES = 4 * 2**30


def patch_bytes(side: int, patch_px: int) -> int:
    """Bytes cutting one patch takes (see :data:`MAX_PATCH_BYTES`)."""
    return 3 * (6 * int(side) ** 2 + 5 * int(patch_px) ** 2)


def check_patch_batch(
    patch_px: int, batch_size: int, in_flight: int = 1, what: str = "batch_size", ahead: int = 0
) -> None:
    """Refuse batches of patches whose memory exceeds :data:`MAX_BATCH_BYTES` (``ahead``: float32 batches made ahead)."""
    per_value = int(in_flight) + 8 + 4 * int(ahead)
    need = int(batch_size) * 3 * int(patch_px) ** 2 * per_value
    if need > MAX_BATCH_BYTES:
        fit = max(0, int(MAX_BATCH_BYTES // (3 * int(patch_px) ** 2 * per_value)))
        made_ahead = f" + 4 x {ahead} float32 batch(es) made ahead" if ahead else ""
        raise ValueError(
            f"A batch of {batch_size} patches of {patch_px} x {patch_px} px needs about {need / 2**30:.1f} GiB "
            f"({batch_size} x 3 x {patch_px}^2 x ({in_flight} uint8 batch(es) in flight + 8 bytes of float32 input "
            f"and its normalised copy{made_ahead})), over the {MAX_BATCH_BYTES / 2**30:.0f} GiB limit "
            f"(MAX_BATCH_BYTES of agl_scverse.pp._patches) before the encoder's own activations. Lower {what} (at "
            f"most {fit} here) or patch_px (encoders take 224 px)."
        )


def as_pad_value(value: Any) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value)).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3 or not np.all(np.isfinite(arr.astype(float))) or arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"pad_value must be one or three numbers in 0..255, got {value!r}.")
    return arr.astype(np.uint8)


def crop_with_padding(
    image: ImageSource | np.ndarray,
    x0: int,
    y0: int,
    side: int,
    pad_mode: str = "constant",
    pad_value: Any = 255,
    level: int = 0,
) -> np.ndarray:
    """The ``side x side`` block of ``image`` with top-left pixel ``(x0, y0)``, padded where it leaves the image."""
    src = open_image(image)
    W, H = src.level_size(level)
    xa, xb = max(x0, 0), min(x0 + side, W)
    ya, yb = max(y0, 0), min(y0 + side, H)
    fill = as_pad_value(pad_value)
    if xa >= xb or ya >= yb:  # entirely outside: nothing to reflect or repeat
        out = np.empty((side, side, 3), dtype=np.uint8)
        out[:] = fill
        return out
    region = src.read_region(xa, ya, xb - xa, yb - ya, level)
    pads = ((ya - y0, y0 + side - yb), (xa - x0, x0 + side - xb), (0, 0))
    if not any(p for pair in pads for p in pair):
        return np.ascontiguousarray(region)
    if pad_mode == "constant":
        out = np.empty((side, side, 3), dtype=np.uint8)
        out[:] = fill
        out[pads[0][0] : pads[0][0] + (yb - ya), pads[1][0] : pads[1][0] + (xb - xa)] = region
        return out
    check_choice("pad_mode", pad_mode, PAD_MODES)
    return np.pad(region, pads, mode="reflect" if pad_mode == "reflect" else "edge")


#: Sub-pixel offsets closer than this to a whole pixel are snapped to it (float noise in stored coordinates).
SUBPIXEL_TOLERANCE = 1e-3


def crop_origin(centres: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left pixel of each ``side x side`` crop around ``centres`` (pixels), and its sub-pixel remainder."""
    origin = np.asarray(centres, dtype=np.float64) - (side - 1) / 2.0 + (0.5 if side % 2 == 0 else 0.0)
    nearest = np.round(origin)
    snap = np.abs(origin - nearest) < SUBPIXEL_TOLERANCE
    origin = np.where(snap, nearest, origin)
    start = np.floor(origin)
    return start.astype(np.int64), origin - start


def subpixel_shift(crop: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """Resample a ``(side + 1, side + 1, 3)`` uint8 crop at offsets ``(fx, fy)`` in [0, 1): ``(side, side, 3)``."""
    c = crop.astype(np.float32)
    c = c[:, :-1] * (1.0 - fx) + c[:, 1:] * fx
    c = c[:-1] * (1.0 - fy) + c[1:] * fy
    return np.clip(np.rint(c), 0, 255).astype(np.uint8)


def resize_patch(patch: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a uint8 (3, h, w) tensor to (3, size, size)."""
    if patch.shape[-1] == size and patch.shape[-2] == size:
        return patch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(patch, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
