"""TIFF, OME-TIFF and SVS files read tile by tile through tifffile's zarr store, tiles kept in the tile cache."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ._files import FileSource
from ._pixels import check_rgb_shape, to_uint8_rgb
from ._source import ImageSource, levels_from_sizes
from ._tile_cache import tile_cache

__all__ = ["STRIP_BAND_ROWS", "TIFF_SUFFIXES", "TiffSource", "is_tiff"]


#: Suffixes read with tifffile (an OME-TIFF ends in ``.ome.tif``); other files are sniffed for the TIFF magic.
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf2", ".tf8", ".ndpi", ".scn", ".qptiff", ".bif")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Strip-organised TIFFs are read and cached in full-width bands of at least this many rows.
STRIP_BAND_ROWS = 256


class TiffSource(FileSource):
    """A TIFF / OME-TIFF / SVS file read through tifffile's zarr store, decoded tiles kept in :func:`tile_cache`."""

    kind = "tiff"
    _handle_attrs = ("_store", "_arrays")

    def __init__(self, path: str | Path, name: str | None = None):
        import tifffile

        FileSource.__init__(self, path, name)
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
        sizes = [_tiff_yxc_shape(axes, shape, self._label) for axes, shape in zip(self._axes, shapes)]
        ImageSource.__init__(self, self._label, levels_from_sizes(sizes), dtype)
        self._store: Any = None
        self._arrays: list | None = None
        self._chunks: list[tuple[int, int]] | None = None

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
        for i, (member, axes) in enumerate(zip(members, self._axes)):
            arr: Any = tifffile.memmap(self.path, series=0, level=i, mode="r") if self._memmappable[i] else member
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


def _tiff_yxc_shape(axes: str, shape: tuple[int, ...], name: str) -> tuple[int, int]:
    """(height, width) of a TIFF series level, with the grayscale / layout checks."""
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"{name} has axes {axes!r}; expected an image with Y and X axes.")
    dims = dict(zip(axes, shape))
    extra = {a: n for a, n in dims.items() if a not in "YXSC" and n > 1}
    if extra:
        warnings.warn(f"{name} has extra axes {extra}; reading their first plane.", UserWarning, stacklevel=4)
    channels = dims.get("S", dims.get("C", 1))
    check_rgb_shape((dims["Y"], dims["X"], channels) if channels != 1 else (dims["Y"], dims["X"]), name)
    return dims["Y"], dims["X"]


def is_tiff(path: Path) -> bool:
    if path.name.lower().endswith(TIFF_SUFFIXES):
        return True
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC
