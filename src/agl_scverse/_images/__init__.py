"""Slide images read by region: the image sources behind :func:`agl_scverse._spatial.get_image`."""

from ._arrays import ArraySource, LazyArraySource, scale_levels
from ._cache_folder import CACHE_ENV, cache_dir, private_folder
from ._decoded import DecodedFileSource
from ._files import check_regular_file, open_pil
from ._live import live_image, register_live_image
from ._metadata import PLAUSIBLE_UM_PER_PX, file_microns_per_pixel
from ._open import open_image
from ._overview import overview
from ._pixels import check_rgb_shape, to_uint8_rgb, value_scale
from ._source import ImageSource, Level, choose_level
from ._tiff import TiffSource
from ._tile_cache import TILE_CACHE_ENV, TileCache, tile_cache

__all__ = [
    "CACHE_ENV",
    "PLAUSIBLE_UM_PER_PX",
    "TILE_CACHE_ENV",
    "ArraySource",
    "DecodedFileSource",
    "ImageSource",
    "LazyArraySource",
    "Level",
    "TileCache",
    "TiffSource",
    "cache_dir",
    "check_regular_file",
    "check_rgb_shape",
    "choose_level",
    "file_microns_per_pixel",
    "live_image",
    "open_image",
    "open_pil",
    "overview",
    "private_folder",
    "register_live_image",
    "scale_levels",
    "tile_cache",
    "to_uint8_rgb",
    "value_scale",
]
