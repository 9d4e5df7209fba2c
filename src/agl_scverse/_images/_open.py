"""The one entry point: any image a slide may hold (array, SpatialData image, path) to an image source."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._arrays import ArraySource, LazyArraySource, is_lazy
from ._decoded import DecodedFileSource
from ._files import check_regular_file
from ._source import ImageSource
from ._tiff import TiffSource, is_tiff

__all__ = ["open_image"]


def open_image(image: Any, name: str = "image", cache_folder: str | Path | None = None) -> ImageSource:
    """The (undecoded) source of a path, an array, a DataTree / DataArray / dask array, or a source as is."""
    if isinstance(image, ImageSource):
        return image
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        check_regular_file(path)  # before its first bytes are read: a FIFO would block for ever
        if is_tiff(path):
            return TiffSource(path)
        return DecodedFileSource(path, cache_folder=cache_folder)
    if isinstance(image, np.ndarray):
        return ArraySource(image, name)
    if is_lazy(image):
        return LazyArraySource.from_object(image, name)
    if hasattr(image, "__array__") and hasattr(image, "shape"):
        return ArraySource(np.asarray(image), name)
    raise TypeError(
        f"{name} is a {type(image).__name__}; expected a file path, a numpy array, an xarray DataArray / DataTree, "
        "a dask array or an ImageSource."
    )
