"""Slide images read by region: the image sources behind :func:`agl_scverse._spatial.get_image`.

A source describes one image (``width``, ``height``, its pyramid ``levels`` with their downsample factors) and
reads any rectangle of it with ``read_region(x0, y0, w, h, level)``, as an ``h' x w' x 3`` uint8 array of the part
that lies inside the image (the caller pads). Nothing is decoded when a source is opened, so memory follows the
regions read, not the image.

Sources
    :class:`TiffSource`
        Tiled or pyramidal TIFF, OME-TIFF, SVS (anything :mod:`tifffile` reads), through a zarr store: only the
        tiles a region touches are decoded, and decoded tiles are kept in a bounded LRU cache shared by the process
        (:func:`tile_cache`, 256 MB by default, ``AGL_SCVERSE_TILE_CACHE_MB`` to change), so neighbouring spots do
        not decode the same tiles again. Uncompressed contiguous TIFFs are memory-mapped.
    :class:`DecodedFileSource`
        JPEG, PNG and other formats PIL reads, which cannot be read by region: decoded once into a ``.npy`` file in
        a cache folder (:func:`cache_dir`; ``AGL_SCVERSE_CACHE`` to change) and memory-mapped from then on. The
        cache file is named after the sha256 of the image file's content (so a file replaced in place, even with
        its modification time restored, is decoded again); the folder must belong to the user and be writable by
        nobody else, cache files are opened without following links, and the decoded copy is preallocated and
        written with ordinary writes, so a full disk is a clean ``OSError`` with no temporary left. The decode
        itself holds the whole image in RAM once (PIL has no region decoder for these formats).
    :class:`ArraySource`
        An in-memory (or memory-mapped) numpy array, e.g. ``uns["spatial"][lib]["images"]["hires"]``.
    :class:`LazyArraySource`
        SpatialData images: an :class:`xarray.DataArray` (dims ``c, y, x``), a multiscale ``DataTree`` (its scale
        levels) or a dask array, read lazily by region.

Pixel values
    Sources return uint8 RGB (an alpha channel is dropped). uint16 images are rescaled (``round(v / 257)``), float
    images in [0, 1] are scaled by 255, other floats clipped to 0..255. Other integer types (int32, uint32, ...) are
    read in the range their values occupy: 8-bit when every value is in 0..255, 16-bit (``round(v / 257)``) when in
    0..65535, refused otherwise; the range is taken on the coarsest level, as for floats. Grayscale images are
    rejected: H&E encoders need RGB.

Files
    Only regular files are opened (a FIFO or a device is refused, not read for ever). A file is identified by its
    path, device, inode, size, modification and change time (the change time moves whenever the content is
    rewritten, even when the modification time is restored), and sources refuse to read a file changed since they
    were opened. PIL's decompression-bomb limit is lifted only while a slide's header is read, never for the
    process.

Pickling
    Sources pickle without open files, zarr stores or memory maps; they reopen lazily on first use (e.g. in a
    DataLoader worker) and after a fork, and refuse to read a file changed since they were opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import threading
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ArraySource",
    "DecodedFileSource",
    "ImageSource",
    "LazyArraySource",
    "Level",
    "TileCache",
    "TiffSource",
    "cache_dir",
    "choose_level",
    "live_image",
    "check_regular_file",
    "open_image",
    "open_pil",
    "file_microns_per_pixel",
    "overview",
    "private_folder",
    "register_live_image",
    "tile_cache",
    "to_uint8_rgb",
    "value_scale",
]

#: Environment variable naming the folder of decoded-image cache files.
CACHE_ENV = "AGL_SCVERSE_CACHE"
#: Environment variable with the byte budget of the tile cache, in MB.
TILE_CACHE_ENV = "AGL_SCVERSE_TILE_CACHE_MB"
DEFAULT_TILE_CACHE_MB = 256
#: Suffixes read with tifffile (an OME-TIFF ends in ``.ome.tif``); other files are sniffed for the TIFF magic.
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf2", ".tf8", ".ndpi", ".scn", ".qptiff", ".bif")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_GRAY_MODES = ("1", "L", "LA", "La", "I", "F")
#: Strip-organised TIFFs are read and cached in full-width bands of at least this many rows.
STRIP_BAND_ROWS = 256
#: Relative tolerance of the pyramid-level rule (level sizes are rounded to whole pixels).
LEVEL_TOLERANCE = 1e-3


class Level(NamedTuple):
    """One pyramid level: its size in pixels and how many level-0 pixels one of its pixels spans."""

    width: int
    height: int
    downsample: float


# ------------------------------------------------------------------------------------------------ pixel values
def check_rgb_shape(shape: Sequence[int], name: str = "image") -> None:
    """Raise a clear error unless ``shape`` is ``(H, W, 3)`` or ``(H, W, 4)``.

    Examples
    --------
    >>> check_rgb_shape((10, 12, 3))
    >>> check_rgb_shape((10, 12))
    Traceback (most recent call last):
    ...
    ValueError: image is grayscale (shape (10, 12)); H&E models need an RGB image (H x W x 3). Convert it, e.g. np.stack([img] * 3, axis=-1), only if it really is a stained slide.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
        raise ValueError(
            f"{name} is grayscale (shape {shape}); H&E models need an RGB image (H x W x 3). "
            "Convert it, e.g. np.stack([img] * 3, axis=-1), only if it really is a stained slide."
        )
    if len(shape) != 3 or shape[2] not in (3, 4):
        raise ValueError(f"{name} has shape {shape}; expected H x W x 3 (RGB).")


def value_scale(dtype: Any, lo: float, hi: float, name: str = "image") -> float:
    """The ``scale`` of :func:`to_uint8_rgb` for an image of ``dtype`` whose values lie in ``[lo, hi]``.

    Floats: 255 when ``hi <= 1`` (an image in [0, 1]), else 1. uint8 and uint16: 1 (their own rules). Other integer
    types: 1 when the values fit 8 bits (0..255), ``1 / 257`` when they fit 16 bits (0..65535); anything else is
    refused, as it has no known white.

    Examples
    --------
    >>> value_scale(np.int32, 0, 40000) == 1 / 257, value_scale(np.float32, 0.0, 0.9)
    (True, 255.0)
    """
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
    """``(h, w, c >= 3)`` pixels of any dtype as contiguous uint8 RGB.

    uint8 is kept, uint16 is rescaled with ``round(v / 257)`` (65535 -> 255), floats are multiplied by ``scale``
    (255 for images in [0, 1], 1 otherwise) and clipped; other integers are 16-bit values (``round(v / 257)``)
    when ``scale`` is ``1 / 257`` and 8-bit values otherwise (see :func:`value_scale`).

    Examples
    --------
    >>> import numpy as np
    >>> to_uint8_rgb(np.array([[[0, 32896, 65535]]], dtype=np.uint16))
    array([[[  0, 128, 255]]], dtype=uint8)
    >>> to_uint8_rgb(np.array([[[0, 32896, 65535]]], dtype=np.int32), 1 / 257)
    array([[[  0, 128, 255]]], dtype=uint8)
    """
    raw = np.asarray(raw)[..., :3]
    if raw.dtype == np.uint8:
        return np.ascontiguousarray(raw)
    if np.issubdtype(raw.dtype, np.floating):
        return np.clip(raw * scale, 0, 255).astype(np.uint8)
    if raw.dtype == np.uint16 or (np.issubdtype(raw.dtype, np.integer) and scale < 1.0):
        return ((np.clip(raw, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
    return np.clip(raw, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ tile cache
class TileCache:
    """A thread-safe LRU cache of decoded tiles with a byte budget.

    Items larger than the budget are not kept. One cache serves the whole process (:func:`tile_cache`); each
    DataLoader worker has its own.

    Parameters
    ----------
    max_bytes
        Budget in bytes (0 disables the cache).

    Examples
    --------
    >>> import numpy as np
    >>> cache = TileCache(max_bytes=1000)
    >>> cache.put("a", np.zeros(600, dtype=np.uint8))
    >>> cache.put("b", np.zeros(600, dtype=np.uint8))  # evicts "a"
    >>> cache.get("a") is None, cache.nbytes
    (True, 600)
    """

    def __init__(self, max_bytes: int = DEFAULT_TILE_CACHE_MB * 2**20):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now (never above ``max_bytes``)."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> np.ndarray | None:
        """The cached array for ``key`` (marked as recently used), or None."""
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key: Hashable, arr: np.ndarray) -> None:
        """Keep ``arr`` under ``key``, evicting the least recently used items beyond the budget."""
        size = int(arr.nbytes)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._nbytes -= int(old.nbytes)
            if size > self.max_bytes:
                return
            self._items[key] = arr
            self._nbytes += size
            while self._nbytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._nbytes -= int(dropped.nbytes)

    def resize(self, max_bytes: int) -> None:
        """Change the budget (evicting as needed)."""
        with self._lock:
            self.max_bytes = int(max_bytes)
            while self._nbytes > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._nbytes -= int(dropped.nbytes)

    def clear(self) -> None:
        """Drop every item and reset the hit counters."""
        with self._lock:
            self._items.clear()
            self._nbytes = 0
            self.hits = self.misses = 0

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at fork time would never be released


def _budget_from_env() -> int:
    value = os.environ.get(TILE_CACHE_ENV)
    if value is None or not value.strip():
        return DEFAULT_TILE_CACHE_MB * 2**20
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"{TILE_CACHE_ENV}={value!r} must be a number of MB >= 0 (e.g. 256).")
    return int(mb * 2**20)


_TILE_CACHE = TileCache(_budget_from_env())
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_TILE_CACHE._after_fork)


def tile_cache() -> TileCache:
    """The process-wide cache of decoded TIFF tiles (``AGL_SCVERSE_TILE_CACHE_MB``, default 256 MB).

    Examples
    --------
    >>> tile_cache().max_bytes >= 0
    True
    """
    return _TILE_CACHE


def cache_dir() -> Path:
    """Folder of the decoded-image cache: ``$AGL_SCVERSE_CACHE``, else ``agl_scverse_cache`` in the temp folder.

    Examples
    --------
    >>> cache_dir().name.startswith("agl_scverse_cache") or True
    True
    """
    value = os.environ.get(CACHE_ENV)
    if value and value.strip():
        return Path(value).expanduser()
    suffix = f"-{os.getuid()}" if hasattr(os, "getuid") else ""  # one folder per user on shared machines
    return Path(tempfile.gettempdir()) / f"agl_scverse_cache{suffix}"


# ------------------------------------------------------------------------------------------------ level rule
def choose_level(levels: Sequence[Level], um_per_px: float, target_um_per_px: float) -> int:
    """Index of the pyramid level whose µm/px is closest to ``target_um_per_px`` without being coarser.

    ``um_per_px`` is the µm/px of level 0; a level is allowed when ``um_per_px * downsample`` is at most the
    target (within 0.1 %, as level sizes are rounded to whole pixels). Level 0 is used when none is fine enough.

    Examples
    --------
    >>> levels = [Level(4000, 4000, 1.0), Level(2000, 2000, 2.0), Level(1000, 1000, 4.0)]
    >>> choose_level(levels, 0.25, 0.5), choose_level(levels, 0.25, 0.9), choose_level(levels, 0.25, 0.2)
    (1, 1, 0)
    """
    best, best_mpp = 0, float(um_per_px) * levels[0].downsample
    for i, lv in enumerate(levels):
        mpp = float(um_per_px) * lv.downsample
        if mpp <= target_um_per_px * (1 + LEVEL_TOLERANCE) and mpp > best_mpp:
            best, best_mpp = i, mpp
    return best


def _levels_from_sizes(sizes: Sequence[tuple[int, int]]) -> list[Level]:
    """Levels from (height, width) pairs, full resolution first; downsample = mean of the two axes' factors."""
    h0, w0 = sizes[0]
    out = [Level(int(w), int(h), float((w0 / w + h0 / h) / 2.0)) for h, w in sizes]
    return [out[0]._replace(downsample=1.0), *out[1:]]


# ------------------------------------------------------------------------------------------------ base class
class ImageSource:
    """An RGB image read by region; the interface of every source (see the module docstring).

    Attributes
    ----------
    name
        Label used in messages.
    levels
        Pyramid levels, full resolution first (a plain image has one).
    kind
        ``"tiff"``, ``"decoded"``, ``"array"`` or ``"lazy"``.

    Notes
    -----
    ``np.asarray(source)`` decodes level 0 whole, and ``source[y0:y1, x0:x1]`` reads that region of level 0, so
    code written for arrays keeps working on small images; use :meth:`read_region` for slides.
    """

    kind = "image"
    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, name: str, levels: Sequence[Level], raw_dtype: Any = np.uint8):
        self.name = str(name)
        self.levels = list(levels)
        self.raw_dtype = np.dtype(raw_dtype)
        self._float_scale: float | None = None

    # -- geometry -------------------------------------------------------------------------------------------
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

    # -- reading --------------------------------------------------------------------------------------------
    def read_region(self, x0: int, y0: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """The part inside the image of the ``w x h`` rectangle with top-left pixel ``(x0, y0)`` of ``level``.

        Parameters
        ----------
        x0, y0
            Top-left pixel in the level's pixel grid (may be negative or beyond the image).
        w, h
            Width and height of the rectangle.
        level
            Pyramid level (0 = full resolution).

        Returns
        -------
        ``(h', w', 3)`` uint8 array, ``h' <= h`` and ``w' <= w``: rows ``max(y0, 0) .. min(y0 + h, height)`` and
        the same for columns; empty when the rectangle misses the image. The caller pads.

        Examples
        --------
        >>> import numpy as np
        >>> src = ArraySource(np.zeros((10, 20, 3), dtype=np.uint8))
        >>> src.read_region(-2, 5, 6, 10).shape
        (5, 4, 3)
        """
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
        """The :func:`value_scale` of the image (floats: 255 when in [0, 1]; other integer types: 8 or 16 bit).

        The value range is taken on the coarsest level, in bands (uint8 / uint16 images are not scanned).
        """
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

    # -- array-likeness, for code written for decoded images -----------------------------------------------------
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


# ------------------------------------------------------------------------------------------------ in memory
class ArraySource(ImageSource):
    """An in-memory (or memory-mapped) ``H x W x 3|4`` numpy array as a source.

    Parameters
    ----------
    array
        The image (uint8, uint16, float in [0, 1], ...); it is not copied.
    name
        Label used in messages.

    Examples
    --------
    >>> import numpy as np
    >>> src = ArraySource(np.full((4, 5, 3), 7, dtype=np.uint8))
    >>> src.width, src.height, src.read_region(3, 0, 4, 2)[..., 0].tolist()
    (5, 4, [[7, 7], [7, 7]])
    """

    kind = "array"

    def __init__(self, array: np.ndarray, name: str = "image"):
        array = np.asarray(array)
        check_rgb_shape(array.shape, name)
        super().__init__(name, [Level(int(array.shape[1]), int(array.shape[0]), 1.0)], array.dtype)
        self.array = array

    def _raw(self, level: int, xa: int, ya: int, xb: int, yb: int) -> np.ndarray:
        return self.array[ya:yb, xa:xb]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self.array[..., :3] if self.array.dtype == np.uint8 else self.read_level(0)
        return arr if dtype is None else arr.astype(dtype)


class LazyArraySource(ImageSource):
    """A SpatialData image, xarray DataArray or dask array, read lazily by region.

    Parameters
    ----------
    levels
        Arrays in ``(y, x, c)`` order, full resolution first, supporting numpy slicing (dask arrays, numpy arrays,
        ``DataArray.data``). Use :meth:`from_object` for DataTrees, DataArrays and ``(c, y, x)`` dask arrays.
    name
        Label used in messages.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> src = LazyArraySource.from_object(da.zeros((3, 100, 80), dtype=np.uint8, chunks=(3, 32, 32)))
    >>> src.width, src.height, src.read_region(70, 90, 20, 20).shape
    (80, 100, (10, 10, 3))
    """

    kind = "lazy"

    def __init__(self, levels: Sequence[Any], name: str = "image"):
        if not levels:
            raise ValueError(f"{name} has no scale level.")
        for lv in levels:
            check_rgb_shape(lv.shape, name)
        super().__init__(name, _levels_from_sizes([tuple(lv.shape[:2]) for lv in levels]), levels[0].dtype)
        self.arrays = list(levels)

    @classmethod
    def from_object(cls, obj: Any, name: str = "image") -> LazyArraySource:
        """A source from a DataTree (multiscale), a DataArray (dims ``c, y, x`` in any order) or a dask array.

        A 3-D dask array is ``(y, x, c)`` when its last axis has 3 or 4 entries, else ``(c, y, x)``.
        """
        return cls([_yxc(a, name) for a in _scale_levels(obj)], name)

    def _raw(self, level: int, xa: int, ya: int, xb: int, yb: int) -> np.ndarray:
        return np.asarray(self.arrays[level][ya:yb, xa:xb])


def _xarray_types() -> tuple[type, type] | None:
    try:
        import xarray as xr
    except ImportError:  # pragma: no cover - xarray comes with spatialdata
        return None
    return xr.DataArray, xr.DataTree


def _is_lazy(obj: Any) -> bool:
    types = _xarray_types()
    return (types is not None and isinstance(obj, types)) or type(obj).__module__.split(".")[0] == "dask"


def _scale_levels(obj: Any) -> list:
    """Scale levels of a DataTree (children ``scale0``, ``scale1``, ... sorted by number) or ``[obj]``."""
    types = _xarray_types()
    if types is not None and isinstance(obj, types[1]):
        keys = sorted(obj.keys(), key=lambda k: int("".join(ch for ch in str(k) if ch.isdigit()) or 0))
        out = []
        for key in keys:
            ds = obj[key].ds
            if not ds.data_vars:
                continue
            out.append(ds[next(iter(ds.data_vars))])
        return out
    return [obj]


def _yxc(arr: Any, name: str) -> Any:
    """An array in (y, x, c) order that slices lazily."""
    types = _xarray_types()
    if types is not None and isinstance(arr, types[0]):
        dims = tuple(arr.dims)
        if "c" not in dims:
            if set(dims) >= {"y", "x"} and len(dims) == 2:
                check_rgb_shape(arr.shape, name)
            raise ValueError(f"{name} has dims {dims}; expected ('c', 'y', 'x') as in SpatialData images.")
        return arr.transpose("y", "x", "c").data
    shape = tuple(arr.shape)
    if len(shape) == 3 and shape[-1] not in (3, 4) and shape[0] in (1, 3, 4):
        return arr.transpose(1, 2, 0)
    return arr


# ------------------------------------------------------------------------------------------------ files
def check_regular_file(path: str | Path, label: str | None = None) -> os.stat_result:
    """``os.stat`` of an image file; refuses a missing path, a folder, a FIFO, a device or a socket.

    A FIFO would block the reader for ever and a device has no end, so only regular files (or links to them) are
    opened.

    Examples
    --------
    >>> check_regular_file("/dev/null")
    Traceback (most recent call last):
    ...
    ValueError: /dev/null is a character device, not a regular image file; refusing to read it. Point the image path at the image file itself.
    """
    label = label or str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file {path} not found. Move it back or fix the path.") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a folder, not an image file.")
    if not stat.S_ISREG(st.st_mode):
        kind = next(
            (n for test, n in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                               (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")) if test(st.st_mode)),
            "special file",
        )  # fmt: skip
        raise ValueError(
            f"{label} is a {kind}, not a regular image file; refusing to read it. Point the image path at the "
            "image file itself."
        )
    return st


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """Device, inode, size, modification and change time: the change time moves with any rewrite of the file."""
    return (int(st.st_dev), int(st.st_ino), int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns))


class _FileSource(ImageSource):
    """A source backed by a regular file: remembers its identity, reopens lazily (after pickling or a fork)."""

    def __init__(self, path: str | Path, name: str | None = None):
        path = Path(path)
        st = check_regular_file(path, name)
        self.path = str(path.resolve())
        self.file_size, self.mtime_ns = int(st.st_size), int(st.st_mtime_ns)
        self.identity = _identity(st)
        self._pid: int | None = None
        self._label = name or f"image file {self.path}"

    @property
    def file_key(self) -> tuple:
        """``(resolved path, device, inode, size, mtime_ns, ctime_ns)``: what the in-process caches are keyed by."""
        return (self.path, *self.identity)

    def _check_unchanged(self) -> None:
        try:
            st = check_regular_file(self.path, self._label)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Image file {self.path} disappeared after it was opened. Move it back or open the image again."
            ) from None
        if _identity(st) != self.identity:
            raise RuntimeError(
                f"Image file {self.path} changed since it was opened (its size, modification or change time, or the "
                "file itself differ); open it again (e.g. build a new SpotPatches) to read the new pixels."
            )

    def _handles_valid(self) -> bool:
        return self._pid == os.getpid()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in self._handle_attrs:
            state[key] = None
        state["_pid"] = None
        return state

    _handle_attrs: tuple[str, ...] = ()


class TiffSource(_FileSource):
    """A TIFF / OME-TIFF / SVS file read tile by tile through tifffile's zarr store.

    Levels are those of the first series (``TiffFile(path).series[0].levels``: a pyramid in SubIFDs, an SVS or
    OME-TIFF pyramid; one level for a flat TIFF). A region decodes only the tiles it touches, and decoded tiles
    go to :func:`tile_cache` keyed by ``(path, size, mtime, level, tile row, tile column)``. A TIFF in strips is
    read in full-width bands of at least 256 rows (``STRIP_BAND_ROWS``); uncompressed contiguous levels are
    memory-mapped instead.

    Parameters
    ----------
    path
        The TIFF file.
    name
        Label used in messages.

    Examples
    --------
    >>> src = TiffSource("slide.ome.tif")  # doctest: +SKIP
    >>> [lv.downsample for lv in src.levels]  # doctest: +SKIP
    [1.0, 4.0, 16.0]
    >>> src.read_region(1000, 2000, 224, 224, level=1).shape  # doctest: +SKIP
    (224, 224, 3)
    """

    kind = "tiff"
    _handle_attrs = ("_store", "_arrays")

    def __init__(self, path: str | Path, name: str | None = None):
        import tifffile

        _FileSource.__init__(self, path, name)
        try:
            with tifffile.TiffFile(self.path) as tf:
                if not tf.series:
                    raise ValueError(f"{self._label} is not a readable TIFF: it holds no image series.")
                series = tf.series[0]
                levels = list(series.levels)
                self._axes = [lv.axes for lv in levels]
                shapes = [tuple(int(s) for s in lv.shape) for lv in levels]
                dtype = series.dtype
                self._memmappable = [bool(lv.dataoffset is not None and lv.keyframe.is_memmappable) for lv in levels]
        except tifffile.TiffFileError as e:
            raise ValueError(f"{self._label} is not a readable TIFF ({e}). Convert it, e.g. to a tiled TIFF.") from e
        sizes = []
        for axes, shape in zip(self._axes, shapes):
            sizes.append(_tiff_yxc_shape(axes, shape, self._label)[:2])
        ImageSource.__init__(self, self._label, _levels_from_sizes(sizes), dtype)
        self._shapes = shapes
        self._store: Any = None
        self._arrays: list | None = None
        self._chunks: list[tuple[int, int]] | None = None

    # -- handles --------------------------------------------------------------------------------------------
    def _open(self) -> list:
        if self._arrays is not None and self._handles_valid():
            return self._arrays
        import tifffile
        import zarr

        self._store = self._arrays = None  # after a fork the parent's file offsets must not be shared
        self._check_unchanged()
        arrays: list = []
        chunks: list[tuple[int, int]] = []
        store = tifffile.imread(self.path, aszarr=True, series=0)
        group = zarr.open(store, mode="r")
        members = [group] if isinstance(group, zarr.Array) else [group[str(i)] for i in range(len(self.levels))]
        for i, (arr, axes) in enumerate(zip(members, self._axes)):
            if self._memmappable[i]:
                arr = tifffile.memmap(self.path, series=0, level=i, mode="r")
            arrays.append(arr)
            ch = arr.chunks if hasattr(arr, "chunks") and arr.chunks is not None else arr.shape
            th, tw = int(ch[axes.index("Y")]), int(ch[axes.index("X")])
            if tw >= self.levels[i].width and th < STRIP_BAND_ROWS:  # strips: cache bands of several strips
                th *= -(-STRIP_BAND_ROWS // th)
            chunks.append((th, tw))
        self._warn_big_chunks(chunks)
        self._store, self._arrays, self._chunks, self._pid = store, arrays, chunks, os.getpid()
        return arrays

    def _warn_big_chunks(self, chunks: list[tuple[int, int]]) -> None:
        if self._chunks is not None:
            return  # warned at the first open
        for i, (ch, mm) in enumerate(zip(chunks, self._memmappable)):
            nbytes = ch[0] * ch[1] * 3 * self.raw_dtype.itemsize
            if not mm and nbytes > 64 * 2**20:
                warnings.warn(
                    f"{self.name} level {i} is stored in blocks of {ch[1]} x {ch[0]} px ({nbytes / 2**20:.0f} MB "
                    "each), so every read decodes whole blocks. Convert it to a tiled pyramid for speed and memory, "
                    "e.g. `vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`.",
                    UserWarning,
                    stacklevel=4,
                )

    def close(self) -> None:
        """Close the zarr store and the file."""
        store, self._store, self._arrays = self._store, None, None
        if store is not None and self._handles_valid():
            with contextlib.suppress(Exception):
                store.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- reading --------------------------------------------------------------------------------------------
    def _raw(self, level: int, xa: int, ya: int, xb: int, yb: int) -> np.ndarray:
        arr = self._open()[level]
        axes = self._axes[level]
        colour = "S" if "S" in axes else "C"  # samples of a pixel (RGB) or, in some OME-TIFFs, channel planes
        picks = {"Y": slice(ya, yb), "X": slice(xa, xb), colour: slice(None)}
        data = np.asarray(arr[tuple(picks.get(a, 0) for a in axes)])  # other axes: their first plane
        kept = [a for a in axes if a in picks]
        return data.transpose([kept.index("Y"), kept.index("X"), kept.index(colour)])

    def _read(self, level: int, xa: int, ya: int, xb: int, yb: int) -> np.ndarray:
        self._open()
        if self._memmappable[level]:
            return to_uint8_rgb(self._raw(level, xa, ya, xb, yb), self.float_scale())
        th, tw = self._chunks[level]  # type: ignore[index]  # the tile, or a band of strips
        width, height = self.level_size(level)
        out = np.empty((yb - ya, xb - xa, 3), dtype=np.uint8)
        cache = tile_cache()
        for ty in range(ya // th, (yb - 1) // th + 1):
            for tx in range(xa // tw, (xb - 1) // tw + 1):
                key = (*self.file_key, level, ty, tx)
                tile = cache.get(key)
                if tile is None:
                    y1, x1 = min((ty + 1) * th, height), min((tx + 1) * tw, width)
                    tile = to_uint8_rgb(self._raw(level, tx * tw, ty * th, x1, y1), self.float_scale())
                    tile.setflags(write=False)
                    cache.put(key, tile)
                oy, ox = ty * th, tx * tw  # the tile's top-left pixel; (sy, sx)-(ey, ex): its overlap with the region
                sy, sx, ey, ex = max(ya, oy), max(xa, ox), min(yb, oy + th), min(xb, ox + tw)
                out[sy - ya : ey - ya, sx - xa : ex - xa] = tile[sy - oy : ey - oy, sx - ox : ex - ox]
        return out


def _tiff_yxc_shape(axes: str, shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    """(height, width, channels) of a TIFF series level, with the grayscale / layout checks."""
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"{name} has axes {axes!r}; expected an image with Y and X axes.")
    dims = dict(zip(axes, shape))
    extra = {a: n for a, n in dims.items() if a not in "YXSC" and n > 1}
    if extra:
        warnings.warn(f"{name} has extra axes {extra}; reading their first plane.", UserWarning, stacklevel=4)
    channels = dims.get("S", dims.get("C", 1))
    check_rgb_shape((dims["Y"], dims["X"], channels) if channels != 1 else (dims["Y"], dims["X"]), name)
    return dims["Y"], dims["X"], channels


class DecodedFileSource(_FileSource):
    """A JPEG / PNG (any PIL format) decoded once into a memory-mapped ``.npy`` cache file.

    Opening reads only the header (size, mode). The first read decodes the image with PIL, which holds the whole
    image in RAM once (4 bytes per pixel; PIL cannot decode these formats by region), writes it in bands of rows
    to ``cache_dir() / <name>-<sha256 of the file>.npy`` (a temporary file, preallocated so a full disk fails at
    once with ``OSError`` and leaves nothing, renamed into place when complete; concurrent processes wait on a lock)
    and memory-maps it; later opens, in this process or another, only map the cache. The file is hashed once per
    file identity (path, device, inode, size, modification and change time), recorded in the cache folder. Keyed by content, a file replaced in place is decoded again even when its size and
    modification time are restored; cache files of images that are gone or were replaced are deleted whenever a
    new image is decoded. The cache folder must be owned by the user and writable by nobody else (the default is
    created 0700), and its files are opened without following links, so nobody else can plant pixels there.

    Parameters
    ----------
    path
        The image file.
    name
        Label used in messages.
    cache_folder
        Where the decoded copy goes; default :func:`cache_dir`.

    Examples
    --------
    >>> src = DecodedFileSource("he.jpg")  # doctest: +SKIP
    >>> src.read_region(0, 0, 64, 64).shape  # doctest: +SKIP
    (64, 64, 3)
    """

    kind = "decoded"
    _handle_attrs = ("_mmap",)

    def __init__(self, path: str | Path, name: str | None = None, cache_folder: str | Path | None = None):
        from PIL import UnidentifiedImageError

        _FileSource.__init__(self, path, name)
        try:
            with open_pil(self.path) as im:
                (width, height), mode = im.size, im.mode
        except UnidentifiedImageError as e:
            raise ValueError(
                f"{self._label} is not an image format agl-scverse reads (PIL and tifffile cannot open it). "
                "Convert it to TIFF, JPEG or PNG."
            ) from e
        if mode in _GRAY_MODES or mode.startswith("I;16"):
            raise ValueError(f"{self._label} is grayscale (mode {mode}); an RGB H&E image is required.")
        ImageSource.__init__(self, self._label, [Level(int(width), int(height), 1.0)], np.uint8)
        self.mode = mode
        self.cache_folder = str(cache_folder) if cache_folder is not None else None
        self._mmap: np.ndarray | None = None
        self._sha256: str | None = None

    @property
    def content_sha256(self) -> str:
        """sha256 of the image file (read once per file identity in a process; checked unchanged first)."""
        if self._sha256 is None:
            self._check_unchanged()
            key = self.file_key
            with _HASH_LOCK:
                digest = _HASHES.get(key)
            if digest is None:
                digest = self._recorded_sha256()
            if digest is None:
                digest = _sha256_of(self.path)
                self._check_unchanged()  # not rewritten while it was hashed
                self._record_sha256(digest)
            with _HASH_LOCK:
                _HASHES[key] = digest
            self._sha256 = digest
        return self._sha256

    @property
    def _folder(self) -> Path:
        return Path(self.cache_folder) if self.cache_folder is not None else cache_dir()

    def _hash_record(self) -> Path:
        """Where the content hash of this file identity is kept (so other processes need not hash it again)."""
        return self._folder / f".id-{hashlib.sha256(repr(self.file_key).encode()).hexdigest()[:32]}.sha256"

    def _recorded_sha256(self) -> str | None:
        try:
            private_folder(self._folder)
            fd = os.open(self._hash_record(), os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd) as fh:
            text = fh.read(65).strip()
        return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None

    def _record_sha256(self, digest: str) -> None:
        with contextlib.suppress(OSError):
            private_folder(self._folder)
            _write_text_atomic(self._hash_record(), digest)

    @property
    def cache_path(self) -> Path:
        """The ``.npy`` file holding the decoded pixels (named after the sha256 of the file's content)."""
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(self.path).stem)[:60]
        return self._folder / f"{stem}-{self.content_sha256[:32]}.npy"

    def _array(self) -> np.ndarray:
        if self._mmap is not None and self._handles_valid():
            return self._mmap
        target = self.cache_path
        private_folder(target.parent)
        arr = _map_npy(target)
        if arr is None:
            self._check_unchanged()
            with _file_lock(target):
                arr = _map_npy(target)  # another process may have written it while we waited
                if arr is None:
                    self._decode_to(target)
                    arr = _map_npy(target)
        if arr is None or arr.shape != (self.height, self.width, 3) or arr.dtype != np.uint8:
            raise RuntimeError(f"Cache file {target} does not match {self.path}; delete it and read again.")
        self._mmap, self._pid = arr, os.getpid()
        return arr

    def _decode_to(self, target: Path) -> None:
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npy")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.height, self.width, 3)}  # fmt: skip
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                np.lib.format.write_array_header_1_0(fh, header)
                if hasattr(os, "posix_fallocate"):  # the whole file now: a full disk fails here, not as SIGBUS later
                    os.posix_fallocate(fh.fileno(), 0, fh.tell() + self.height * self.width * 3)
                with open_pil(self.path) as im:
                    if im.mode not in ("RGB", "RGBA"):
                        im = im.convert("RGB")
                    im.load()  # the one full decode
                    band = max(1, (1 << 22) // max(self.width, 1))  # copy in bands of ~4 M pixels
                    for y in range(0, self.height, band):
                        y1 = min(y + band, self.height)
                        fh.write(np.ascontiguousarray(np.asarray(im.crop((0, y, self.width, y1)))[..., :3]).tobytes())
            os.replace(tmp, target)
            rec = {"path": self.path, "size": self.file_size, "mtime_ns": self.mtime_ns}
            _write_text_atomic(target.with_suffix(".json"), json.dumps(rec))
        except OSError as e:
            raise OSError(
                e.errno,
                f"Could not write the decoded copy of {self.path} ({self.height} x {self.width} px, "
                f"{self.height * self.width * 3 / 2**20:.0f} MB) to the image cache {target.parent}: {e.strerror or e}. "
                f"Free space there or set {CACHE_ENV} to a folder with room; nothing was left behind.",
            ) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _prune_stale(target.parent)

    def _raw(self, level: int, xa: int, ya: int, xb: int, yb: int) -> np.ndarray:
        return self._array()[ya:yb, xa:xb]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self._array()
        return arr if dtype is None else arr.astype(dtype)

    def close(self) -> None:
        """Drop the memory map."""
        self._mmap = None


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_HASHES: dict[tuple, str] = {}  # file identity -> sha256 of its content, for this process
_HASH_LOCK = threading.Lock()
_PIL_LOCK = threading.Lock()


def _sha256_of(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_pil(path: str | Path) -> Any:
    """``PIL.Image.open(path)`` with the decompression-bomb limit lifted for this call only (slides are large).

    PIL checks its process-wide ``MAX_IMAGE_PIXELS`` when a file is opened; it is set to None while the header is
    read and put back before anyone else opens an image through this function, so no process-wide setting changes.

    Examples
    --------
    >>> with open_pil("he.jpg") as im:  # doctest: +SKIP
    ...     im.size
    """
    from PIL import Image

    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def private_folder(folder: Path) -> Path:
    """``folder``, created 0700 when missing; refused unless it is a real folder of this user writable by no one else.

    A cache folder someone else owns or can write to could hold planted files that would be read as pixels.

    Examples
    --------
    >>> import tempfile
    >>> private_folder(Path(tempfile.mkdtemp()) / "cache").stat().st_mode & 0o777 == 0o700
    True
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"Cannot create the image cache folder {folder} ({e}); set {CACHE_ENV} to a writable folder."
        ) from e
    if not hasattr(os, "geteuid"):  # Windows: no owner check
        return folder
    st = os.lstat(folder)
    problem = ""
    if not stat.S_ISDIR(st.st_mode):
        problem = "is a link, not a folder" if stat.S_ISLNK(st.st_mode) else "is not a folder"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to another user (uid {st.st_uid}, you are {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"can be written by others (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        raise PermissionError(
            f"The image cache folder {folder} {problem}: a file placed there by someone else would be read as "
            f"pixels. Set {CACHE_ENV} to a folder of your own that only you can write (e.g. ~/.cache/agl_scverse)."
        )
    return folder


def _map_npy(path: Path) -> np.ndarray | None:
    """A read-only memory map of the ``.npy`` file ``path`` (not followed if a link; ours only), or None if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a link
        raise PermissionError(f"Cache file {path} is a link or cannot be opened ({e}); delete it.") from e
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
            raise PermissionError(f"Cache file {path} is not a regular file of yours; delete it.")
        fmt = np.lib.format
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(fh))
        if read_header is None:
            return None
        shape, fortran, dtype = read_header(fh)
        if fortran or dtype != np.uint8:
            return None
        return np.memmap(fh, dtype=dtype, mode="r", shape=shape, offset=fh.tell())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _prune_stale(folder: Path) -> None:
    """Delete cache files whose source image is gone or was replaced (their ``.json`` records path, size, mtime)."""
    for meta in folder.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            rec = json.loads(meta.read_text())
            try:
                st = os.stat(rec["path"])
                stale = (int(st.st_size), int(st.st_mtime_ns)) != (int(rec["size"]), int(rec["mtime_ns"]))
            except FileNotFoundError:
                stale = True
            if stale:
                for path in (meta.with_suffix(".npy"), meta.with_suffix(".npy.lock"), meta):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()


@contextlib.contextmanager
def _file_lock(target: Path) -> Iterator[None]:
    """An exclusive lock next to ``target`` (POSIX; elsewhere the atomic rename alone keeps the cache valid).

    The lock file is opened without following links and never truncated, so a link planted in its place cannot
    damage the file it points to.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock = target.with_name(target.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    except OSError as e:
        raise PermissionError(f"Cannot open the cache lock {lock} ({e}); if it is a link, delete it.") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ live images
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LIVE_LOCK = threading.Lock()


def register_live_image(obj: Any) -> str:
    """A token naming an in-memory image object (e.g. a SpatialData image element) for :func:`live_image`.

    The object is held by a weak reference: the token resolves while the object lives (e.g. while its SpatialData
    does) and to None afterwards, so an AnnData can name a full-resolution image without copying it into ``.uns``
    (the token is a plain string, h5ad-serialisable). Registering the same object again gives the same token.

    Examples
    --------
    >>> import xarray as xr, numpy as np
    >>> img = xr.DataArray(np.zeros((3, 4, 4), np.uint8), dims=("c", "y", "x"))
    >>> live_image(register_live_image(img)) is img
    True
    """
    with _LIVE_LOCK:
        for token, value in _LIVE.items():
            if value is obj:
                return token
        token = f"live-{uuid.uuid4().hex}"
        _LIVE[token] = obj
        return token


def live_image(token: str | None) -> Any:
    """The object registered under ``token`` by :func:`register_live_image`, or None when it is gone."""
    if not token:
        return None
    with _LIVE_LOCK:
        return _LIVE.get(str(token))


# ------------------------------------------------------------------------------------------------ factory
def _is_tiff(path: Path) -> bool:
    if path.name.lower().endswith(TIFF_SUFFIXES):
        return True
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def open_image(image: Any, name: str = "image", cache_folder: str | Path | None = None) -> ImageSource:
    """The image source for a file path, an array, a SpatialData image or an existing source.

    Parameters
    ----------
    image
        A path (TIFF family -> :class:`TiffSource`, other formats -> :class:`DecodedFileSource`), a numpy array
        (:class:`ArraySource`), a DataTree / DataArray / dask array (:class:`LazyArraySource`) or an
        :class:`ImageSource` (returned as is).
    name
        Label used in messages (files are named by their path).
    cache_folder
        Folder of the decoded-image cache for JPEG / PNG files; default :func:`cache_dir`.

    Returns
    -------
    The source; nothing is decoded yet.

    Examples
    --------
    >>> import numpy as np
    >>> open_image(np.zeros((8, 8, 3), dtype=np.uint8)).kind
    'array'
    >>> open_image("he.jpg").kind  # doctest: +SKIP
    'decoded'
    """
    if isinstance(image, ImageSource):
        return image
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        check_regular_file(path)  # before its first bytes are read: a FIFO would block for ever
        if _is_tiff(path):
            return TiffSource(path)
        return DecodedFileSource(path, cache_folder=cache_folder)
    if isinstance(image, np.ndarray):
        return ArraySource(image, name)
    if _is_lazy(image):
        return LazyArraySource.from_object(image, name)
    if hasattr(image, "__array__") and hasattr(image, "shape"):
        return ArraySource(np.asarray(image), name)
    raise TypeError(
        f"{name} is a {type(image).__name__}; expected a file path, a numpy array, an xarray DataArray / DataTree, "
        "a dask array or an ImageSource."
    )


# ------------------------------------------------------------------------------------------------ metadata, overviews
#: µm per pixel outside this range in a file's resolution tags is taken as a placeholder (e.g. 72 dpi), not a scale.
PLAUSIBLE_UM_PER_PX = (0.01, 50.0)
_UNIT_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def file_microns_per_pixel(path: str | Path) -> tuple[float, str] | None:
    """µm per level-0 pixel recorded in an image file, and where it came from; None when the file records none.

    Read, in this order, from OME-XML ``PhysicalSizeX`` (with its unit), an Aperio SVS description's ``MPP``, then
    the TIFF ``XResolution`` tag with ``ResolutionUnit`` inch or centimetre. Values outside
    :data:`PLAUSIBLE_UM_PER_PX` (a 72-dpi placeholder is 353 µm/px) are ignored. JPEG / PNG files give None: their
    dpi fields are display hints, not the scanner's scale.

    Examples
    --------
    >>> file_microns_per_pixel("slide.ome.tif")  # doctest: +SKIP
    (0.25, 'OME PhysicalSizeX')
    """
    import tifffile

    path = Path(path)
    check_regular_file(path)
    if not _is_tiff(path):
        return None
    found: list[tuple[float, str]] = []
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            if tf.is_ome and tf.ome_metadata:
                found += _ome_physical_size(tf.ome_metadata)
            if tf.is_svs:
                mpp = tifffile.svs_description_metadata(page.description).get("MPP")
                if mpp is not None:
                    found.append((float(mpp), "SVS MPP"))
            tags = page.tags
            res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            if res is not None and unit is not None and int(unit.value) in (2, 3):
                num, den = res.value
                if num > 0 and den > 0:
                    per_unit = num / den  # pixels per inch (2) or per centimetre (3)
                    found.append(((25400.0 if int(unit.value) == 2 else 1e4) / per_unit, "TIFF XResolution"))
    except (tifffile.TiffFileError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable TIFF ({e}).") from e
    lo, hi = PLAUSIBLE_UM_PER_PX
    for value, source in found:
        if lo <= value <= hi:
            return float(value), source
    return None


def _ome_physical_size(xml: str) -> list[tuple[float, str]]:
    """``PhysicalSizeX`` of the first OME ``Pixels`` element in µm (empty when absent or in an unknown unit)."""
    import re

    m = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if m is None:
        return []
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0)))
    if "PhysicalSizeX" not in attrs:
        return []
    unit = _UNIT_UM.get(attrs.get("PhysicalSizeXUnit", "µm"))
    return [] if unit is None else [(float(attrs["PhysicalSizeX"]) * unit, "OME PhysicalSizeX")]


def overview(image: Any, downsample: float) -> tuple[np.ndarray, float]:
    """A whole image at about ``1 / downsample`` of its size, read from the nearest finer pyramid level.

    JPEG / PNG files are decoded at a reduced size (PIL ``draft``) without the full-resolution cache; TIFFs and
    SpatialData images read the coarsest level not coarser than asked, then resize it (PIL, area filter).

    Returns
    -------
    The RGB uint8 image and its actual downsample (level-0 pixels per output pixel, along x).

    Examples
    --------
    >>> img, ds = overview(np.zeros((64, 48, 3), dtype=np.uint8), 4)
    >>> img.shape, ds
    ((16, 12, 3), 4.0)
    """
    from PIL import Image

    downsample = max(1.0, float(downsample))
    if isinstance(image, str | os.PathLike) and not _is_tiff(Path(image)):
        check_regular_file(image)
        with open_pil(image) as im:
            w, h = im.size
            tw, th = max(1, round(w / downsample)), max(1, round(h / downsample))
            im.draft("RGB", (tw, th))
            rgb = im.convert("RGB")
            if rgb.size != (tw, th):
                rgb = rgb.resize((tw, th), Image.Resampling.BOX)
            return np.asarray(rgb, dtype=np.uint8), w / tw
    src = open_image(image)
    w, h = src.width, src.height
    tw, th = max(1, round(w / downsample)), max(1, round(h / downsample))
    level = max(
        (i for i, lv in enumerate(src.levels) if lv.downsample <= downsample * (1 + LEVEL_TOLERANCE)), default=0
    )
    arr = src.read_level(level)
    if arr.shape[:2] != (th, tw):
        arr = np.asarray(Image.fromarray(arr).resize((tw, th), Image.Resampling.BOX), dtype=np.uint8)
    return arr, w / tw
