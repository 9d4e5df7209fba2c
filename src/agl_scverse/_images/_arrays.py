"""Images in memory: numpy arrays, and SpatialData images (xarray, multiscale trees, dask) read lazily by region."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._pixels import check_rgb_shape
from ._source import ImageSource, Level, levels_from_sizes

__all__ = ["ArraySource", "LazyArraySource", "is_lazy", "scale_levels"]


class ArraySource(ImageSource):
    """An in-memory (or memory-mapped) ``H x W x 3|4`` numpy array as a source (not copied)."""

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
    """A SpatialData image, xarray DataArray or dask array read lazily by region; ``levels`` in (y, x, c) order."""

    kind = "lazy"

    def __init__(self, levels: Sequence[Any], name: str = "image"):
        if not levels:
            raise ValueError(f"{name} has no scale level.")
        for lv in levels:
            check_rgb_shape(lv.shape, name)
        super().__init__(name, levels_from_sizes([tuple(lv.shape[:2]) for lv in levels]), levels[0].dtype)
        self.arrays = list(levels)

    @classmethod
    def from_object(cls, obj: Any, name: str = "image") -> LazyArraySource:
        """A source from a DataTree (multiscale), a DataArray (dims ``c, y, x``) or a dask array (y, x, c or c, y, x)."""
        return cls([_yxc(a, name) for a in scale_levels(obj)], name)

    def _raw(self, level: int, xa: int, ya: int, xb: int, yb: int) -> np.ndarray:
        return np.asarray(self.arrays[level][ya:yb, xa:xb])


def is_lazy(obj: Any) -> bool:
    import xarray as xr

    return isinstance(obj, xr.DataArray | xr.DataTree) or type(obj).__module__.split(".")[0] == "dask"


def scale_levels(obj: Any) -> list:
    """Scale levels of a DataTree (children ``scale0``, ``scale1``, ... sorted by number) or ``[obj]``."""
    import xarray as xr

    if isinstance(obj, xr.DataTree):
        keys = sorted(obj.keys(), key=lambda k: int("".join(ch for ch in str(k) if ch.isdigit()) or 0))
        return [ds[next(iter(ds.data_vars))] for ds in (obj[k].ds for k in keys) if ds.data_vars]
    return [obj]


def _yxc(arr: Any, name: str) -> Any:
    """An array in (y, x, c) order that slices lazily."""
    import xarray as xr

    if isinstance(arr, xr.DataArray):
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
