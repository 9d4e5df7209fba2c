"""Slide images read by region: the image sources behind :func:`agl_scverse._spatial.get_image`.

One job per module: ``_source`` (levels, the level rule, the base class), ``_pixels`` (value ranges to uint8 RGB),
``_arrays`` (in memory, SpatialData), ``_files`` (safe opening, file identity, PIL), ``_tiff`` (tiled reads),
``_decoded`` (JPEG/PNG decoded once) with ``_cache_folder`` (its private folder, locks, whole-file writes),
``_tile_cache`` (decoded TIFF tiles), ``_live`` (in-memory images by token), ``_open`` (any image to a source),
``_metadata`` (µm per pixel from a file) and ``_overview`` (a whole image at low resolution). This package's face
hands on the names the rest of agl-scverse uses.

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

from ._arrays import ArraySource, LazyArraySource
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
    "tile_cache",
    "to_uint8_rgb",
    "value_scale",
]
