"""Reader for a bare H&E image (no spots, no counts): the start of whole-slide prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse._images import PLAUSIBLE_UM_PER_PX, file_microns_per_pixel, open_image, overview

from ._common import positive_number, spatial_entry

__all__ = ["read_he_image", "DEFAULT_SPOT_UM"]

#: Spot diameter (µm) recorded for a bare image until a grid sets its own: a Visium spot.
DEFAULT_SPOT_UM = 55.0


def read_he_image(
    path: str | Path | Any,
    *,
    microns_per_pixel: float | None = None,
    library_id: str | None = None,
    hires_max_px: int = 2000,
    image_key: str | None = None,
) -> AnnData:
    """Read a bare H&E image (JPEG, PNG, TIFF, OME-TIFF, SVS file or a SpatialData image) as a slide without spots.

    The image is not decoded: it is read by region when patches are cut. Lay spots over it with
    :func:`agl_scverse.pp.spot_grid`, then predict them with :func:`agl_scverse.tl.predict_anndata`.

    Parameters
    ----------
    path
        The full-resolution image file, a :class:`spatialdata.SpatialData` (its image ``image_key``) or an image
        element.
    microns_per_pixel
        µm per full-resolution pixel. Default: read from the file (OME, SVS, TIFF resolution) or from the element's
        transformation to a coordinate system in µm; required for JPEG / PNG. It wins over the file's (a warning
        when they differ by more than 10%).
    library_id
        Name of the slide (default: the file name without its suffixes, or the image element's name).
    hires_max_px
        Longest side of the downscaled ``"hires"`` image kept in memory.
    image_key
        The image element of a SpatialData holding several.

    Returns
    -------
    AnnData of 0 spots x 0 genes whose ``.uns["spatial"][library_id]`` holds the ``"hires"`` image, scale factors
    and metadata (``source_image_path``, ``image_width``, ``image_height``, ...), the layout of the other readers.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> slide = agl.io.read_he_image("he.jpg", microns_per_pixel=0.71)  # doctest: +SKIP
    >>> grid = agl.pp.spot_grid(slide, spot_um=55, pitch_um=100)  # doctest: +SKIP
    >>> pred = agl.tl.predict_anndata(grid, "my_model")  # doctest: +SKIP
    """
    if hires_max_px <= 0:
        raise ValueError(f"hires_max_px must be positive, got {hires_max_px}.")
    if not isinstance(path, (str, Path)):
        from ._sd_slide import sd_image_entry

        name, entry, width, height = sd_image_entry(path, image_key, microns_per_pixel, DEFAULT_SPOT_UM, hires_max_px)
        return _slide(str(library_id) if library_id is not None else name, entry, f"image element {name!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the path of an H&E image file.")
    src = open_image(path)  # checks it is a regular RGB image file; decodes nothing
    width, height = src.width, src.height
    recorded = file_microns_per_pixel(path)
    if microns_per_pixel is not None:
        mpp = positive_number(microns_per_pixel, "microns_per_pixel", "Pass µm per pixel, e.g. 0.5.")
        mpp_source = "given"
        if recorded is not None and abs(recorded[0] - mpp) > 0.1 * mpp:
            logg.warning(
                f"{path.name}: microns_per_pixel={mpp:g} given, but the file records {recorded[0]:g} "
                f"({recorded[1]}); using the given value."
            )
    elif recorded is not None:
        mpp, mpp_source = recorded
    else:
        lo, hi = PLAUSIBLE_UM_PER_PX
        raise ValueError(
            f"{path} records no µm per pixel (no OME PhysicalSizeX, SVS MPP or TIFF resolution tag in {lo:g}..{hi:g} "
            "µm/px). Pass microns_per_pixel=<µm per full-resolution pixel> (e.g. 0.5 for a 20x scan, 0.25 for 40x)."
        )
    hires, ds = overview(path, max(1.0, max(width, height) / hires_max_px))
    lib = str(library_id) if library_id is not None else path.name.split(".")[0]
    entry = spatial_entry(
        hires,
        1.0 / ds,
        spot_diameter_fullres=DEFAULT_SPOT_UM / mpp,
        microns_per_pixel=mpp,
        source_image_path=path,
        microns_per_pixel_source=mpp_source,
        image_width=int(width),
        image_height=int(height),
        reader="read_he_image",
    )
    return _slide(lib, entry, path.name)


def _slide(lib: str, entry: dict, what: str) -> AnnData:
    """The AnnData of 0 spots x 0 genes holding one slide's ``.uns['spatial']`` entry."""
    adata = AnnData(
        X=np.zeros((0, 0), dtype=np.float32),
        obs=pd.DataFrame({consts.LIBRARY_KEY: pd.Categorical([], categories=[lib])}, index=pd.Index([], dtype=str)),
    )
    adata.obsm[consts.SPATIAL_KEY] = np.zeros((0, 2), dtype=np.float64)
    adata.uns[consts.SPATIAL_KEY] = {lib: entry}
    meta, sf = entry[consts.METADATA], entry[consts.SCALEFACTORS]
    logg.info(
        f"read H&E image {what}: {meta['image_width']} x {meta['image_height']} px at "
        f"{sf[consts.MICRONS_PER_PIXEL]:g} µm/px ({meta[consts.MICRONS_PER_PIXEL_SOURCE]}), library {lib!r}"
    )
    return adata
