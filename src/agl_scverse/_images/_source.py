"""What every image source is: pyramid levels, the level rule, and the base class that reads regions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ._pixels import to_uint8_rgb, value_scale

__all__ = ["LEVEL_TOLERANCE", "ImageSource", "Level", "choose_level", "levels_from_sizes"]


#: Relative tolerance of the pyramid-level rule (level sizes are rounded to whole pixels).
LEVEL_TOLERANCE = 1e-3


class Level(NamedTuple):
    """One pyramid level: its size in pixels and how many level-0 pixels one of its pixels spans."""

    width: int
    height: int
    downsample: float


def choose_level(levels: Sequence[Level], um_per_px: float, target_um_per_px: float) -> int:
    """The level whose µm/px is closest to the target without being coarser (0.1 % slack); else level 0."""
    best, best_mpp = 0, float(um_per_px) * levels[0].downsample
    for i, lv in enumerate(levels):
        mpp = float(um_per_px) * lv.downsample
        if mpp <= target_um_per_px * (1 + LEVEL_TOLERANCE) and mpp > best_mpp:
            best, best_mpp = i, mpp
    return best


def levels_from_sizes(sizes: Sequence[tuple[int, int]]) -> list[Level]:
    """Levels from (height, width) pairs, full resolution first; downsample = mean of the two axes' factors."""
    h0, w0 = sizes[0]
    out = [Level(int(w), int(h), float((w0 / w + h0 / h) / 2.0)) for h, w in sizes]
    return [out[0]._replace(downsample=1.0), *out[1:]]


class ImageSource:
    """An RGB image read by region, ``levels`` full resolution first; ``kind`` is tiff, decoded, array or lazy."""

    kind = "image"
    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, name: str, levels: Sequence[Level], raw_dtype: Any = np.uint8):
        self.name = str(name)
        self.levels = list(levels)
        self.raw_dtype = np.dtype(raw_dtype)
        self._float_scale: float | None = None

    @property
    def width(self) -> int:
        """Width of level 0 in pixels."""
        return self.levels[0].width

    @property
    def height(self) -> int:
        """Height of level 0 in pixels."""
        return self.levels[0].height

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, 3)`` of level 0, as for an array."""
        return (self.height, self.width, 3)

    def level_size(self, level: int = 0) -> tuple[int, int]:
        """``(width, height)`` of a level."""
        lv = self.levels[self._check_level(level)]
        return lv.width, lv.height

    def choose_level(self, um_per_px: float, target_um_per_px: float) -> int:
        """The pyramid level for ``target_um_per_px`` given level 0's ``um_per_px`` (see :func:`choose_level`)."""
        return choose_level(self.levels, um_per_px, target_um_per_px)

    def _check_level(self, level: int) -> int:
        if not isinstance(level, int | np.integer) or not 0 <= int(level) < len(self.levels):
            raise ValueError(
                f"level={level!r} is not a level of {self.name}; it has {len(self.levels)} (0..{len(self.levels) - 1})."
            )
        return int(level)

    def read_region(self, x0: int, y0: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """uint8 RGB of the part inside the level of the ``w x h`` rectangle at ``(x0, y0)`` (the caller pads)."""
        level = self._check_level(level)
        width, height = self.level_size(level)
        x0, y0, w, h = int(x0), int(y0), int(w), int(h)
        if w < 0 or h < 0:
            raise ValueError(f"read_region needs w, h >= 0, got w={w}, h={h}.")
        xa, xb = max(x0, 0), min(x0 + w, width)
        ya, yb = max(y0, 0), min(y0 + h, height)
        if xa >= xb or ya >= yb:
            return np.zeros((max(yb - ya, 0), max(xb - xa, 0), 3), dtype=np.uint8)
        return self._read(level, xa, ya, xb, yb)

    def read_level(self, level: int = 0) -> np.ndarray:
        """A whole level as one array (decodes it all: for small levels and thumbnails)."""
        width, height = self.level_size(level)
        return self.read_region(0, 0, width, height, level)

    def _read(self, level: int, xa: int, ya: int, xb: int, yb: int) -> np.ndarray:
        """uint8 RGB pixels of a rectangle inside the level (subclasses may cache)."""
        return to_uint8_rgb(self._raw(level, xa, ya, xb, yb), self.float_scale())

    def _raw(self, level: int, xa: int, ya: int, xb: int, yb: int) -> np.ndarray:
        """Stored pixels ``(h, w, c)`` of a rectangle inside the level, in the stored dtype."""
        raise NotImplementedError

    def float_scale(self) -> float:
        """The :func:`value_scale` of the image, from the value range of its coarsest level (read in bands)."""
        if self._float_scale is None:
            scale = 1.0
            dt = self.raw_dtype
            if np.issubdtype(dt, np.floating) or (np.issubdtype(dt, np.integer) and dt not in (np.uint8, np.uint16)):
                level = len(self.levels) - 1
                width, height = self.level_size(level)
                step = max(1, (1 << 24) // max(width, 1))  # bands of ~16 M pixels
                lo, hi = np.inf, -np.inf
                for y in range(0, height, step):
                    band = np.asarray(self._raw(level, 0, y, width, min(y + step, height)))[..., :3]
                    if band.size and not (np.issubdtype(dt, np.floating) and np.all(np.isnan(band))):
                        lo, hi = min(lo, float(np.nanmin(band))), max(hi, float(np.nanmax(band)))
                scale = value_scale(dt, lo, hi, self.name) if np.isfinite(hi) else 1.0
            self._float_scale = scale
        return self._float_scale

    def close(self) -> None:
        """Release open files (the source reopens them when read again)."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self.read_level(0)
        return arr if dtype is None else arr.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        region = _region_key(key, self.height, self.width)
        if region is None:
            return np.asarray(self)[key]
        (ya, yb), (xa, xb), rest = region
        out = self.read_region(xa, ya, xb - xa, yb - ya)
        return out[(slice(None), slice(None), *rest)] if rest else out

    def __repr__(self) -> str:
        lv = ", ".join(
            f"{v.width}x{v.height}" + (f" (/{v.downsample:.3g})" if i else "") for i, v in enumerate(self.levels)
        )
        return f"{type(self).__name__}({self.name}: {lv})"


def _region_key(key: Any, height: int, width: int) -> tuple | None:
    """``((ya, yb), (xa, xb), rest)`` for ``[y0:y1, x0:x1, ...]`` keys with unit steps, else None."""
    if not isinstance(key, tuple):
        key = (key,)
    if len(key) < 2 or len(key) > 3 or not all(isinstance(k, slice) for k in key[:2]):
        return None
    if any(k.step not in (None, 1) for k in key[:2]):
        return None
    ya, yb, _ = key[0].indices(height)
    xa, xb, _ = key[1].indices(width)
    return (ya, max(yb, ya)), (xa, max(xb, xa)), key[2:]
