"""A bare slide as SpatialData: an image element read as an H&E-only slide, and grid predictions written out."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from agl_scverse import _constants as consts
from agl_scverse import _spatial
from agl_scverse._images import PLAUSIBLE_UM_PER_PX, register_live_image

from ._common import positive_number, spatial_entry
from ._sd_elements import coordinate_systems, hires_thumbnail, is_backed, pick_image, scale_levels, um_scale

__all__ = ["sd_image_entry", "slide_to_spatialdata", "write_spatialdata", "GRID_SHAPES_SUFFIX"]

#: The shapes element of a grid is named ``<library_id><GRID_SHAPES_SUFFIX>``; the image element ``<library_id>``.
GRID_SHAPES_SUFFIX = "_grid"
#: Chunk side (pixels) of an image element made from an image file; pyramid levels halve until this size.
IMAGE_CHUNK_PX = 2048


def sd_image_entry(
    data: Any, image_key: str | None, microns_per_pixel: float | None, spot_um: float, hires_max_px: int
) -> tuple[str, dict, int, int]:
    """``(image name, uns['spatial'] entry, width, height)`` of a SpatialData's image element, or of an element."""
    from spatialdata import SpatialData

    sdata = data if isinstance(data, SpatialData) else None
    if sdata is not None:
        name, image = pick_image(sdata, image_key)
    else:
        name, image = str(image_key or getattr(data, "name", None) or "image"), data
    levels = scale_levels(image)
    full = levels[0]
    if full.sizes.get("c", 1) not in (3, 4):
        raise ValueError(f"Image {name!r} has {full.sizes.get('c', 1)} channel(s); an RGB H&E image is required.")
    height, width = int(full.sizes["y"]), int(full.sizes["x"])
    if microns_per_pixel is not None:
        mpp, source = positive_number(microns_per_pixel, "microns_per_pixel", "Pass µm per pixel, e.g. 0.5."), "given"
    else:
        found = um_scale(image, name)
        if found is None:
            lo, hi = PLAUSIBLE_UM_PER_PX
            raise ValueError(
                f"Image {name!r} records no µm per pixel (no coordinate system in µm among {coordinate_systems(image)}"
                f"). Pass microns_per_pixel=<µm per full-resolution pixel, {lo:g}..{hi:g}>, or give the element a "
                "transformation to a coordinate system named 'um' (spatialdata.transformations.Scale)."
            )
        mpp, source = found
    hires, scalef = hires_thumbnail(levels, width, hires_max_px, name)
    meta = {
        consts.MICRONS_PER_PIXEL_SOURCE: source,
        consts.SPATIALDATA_IMAGE: name,
        consts.SPATIALDATA_IMAGE_TOKEN: register_live_image(image),
        "image_width": width,
        "image_height": height,
        "reader": "read_he_image",
    }
    if sdata is not None and getattr(sdata, "path", None) is not None and is_backed(sdata, name):
        meta[consts.SPATIALDATA_PATH] = str(Path(sdata.path).resolve())
    entry = spatial_entry(hires, scalef, spot_diameter_fullres=spot_um / mpp, microns_per_pixel=mpp, **meta)
    return name, entry, width, height


class _RegionReader:
    """An image source as an array dask can slice (``shape``, ``dtype``, ``ndim``, regions by ``[y, x, c]``)."""

    def __init__(self, src: Any):
        self.src, self.shape, self.dtype, self.ndim = src, tuple(src.shape), np.dtype(np.uint8), 3

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.src[key], dtype=np.uint8)


def _image_element(pred: AnnData, lib: str, transformations: dict) -> Any:
    """The slide's image as a SpatialData image element: the element it was read from, else the file read lazily."""
    import dask.array as da
    from spatialdata.models import Image2DModel

    from agl_scverse._images import live_image

    meta = _spatial.library_entry(pred, lib).get(consts.METADATA) or {}
    element = live_image(meta.get(consts.SPATIALDATA_IMAGE_TOKEN))
    if element is not None:
        return element
    src, scale, which = _spatial.get_image(pred, lib, warn=False)
    if which != consts.FULLRES or abs(scale - 1.0) > 1e-9:
        raise ValueError(
            f"Library {lib!r} has no full-resolution image (only {which!r}); write it with image=False, or read the "
            "slide with its full-resolution image."
        )
    arr = da.from_array(_RegionReader(src), chunks=(IMAGE_CHUNK_PX, IMAGE_CHUNK_PX, 3), asarray=False)
    factors, side = [], max(src.width, src.height)
    while side > IMAGE_CHUNK_PX:
        factors.append(2)
        side //= 2
    return Image2DModel.parse(
        arr,
        dims=("y", "x", "c"),
        c_coords=["r", "g", "b"],
        scale_factors=factors or None,
        transformations=transformations,
    )


def slide_to_spatialdata(
    pred: AnnData, *, library_id: str | None = None, image: bool = True, table_key: str = "table"
) -> Any:
    """Grid predictions as a SpatialData: the H&E image, the grid's circles and a table annotating them.

    Parameters
    ----------
    pred
        The AnnData of :func:`agl_scverse.tl.predict_anndata` on a grid of :func:`agl_scverse.pp.spot_grid` (or
        any AnnData of spots with ``.obsm["spatial"]`` and one library's ``.uns["spatial"]``).
    library_id
        The library to write (default: the only one).
    image
        Also write the image element (the slide's own SpatialData element, or its image file read lazily).
    table_key
        Name of the table.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with the image element ``<library_id>``, circles ``<library_id>_grid``
    and the table of ``pred``'s spots, mapped to ``"global"`` (pixels) and ``"um"`` (µm).

    Examples
    --------
    >>> sdata = agl.io.slide_to_spatialdata(pred)  # doctest: +SKIP
    >>> sdata.write("slide_predicted.zarr")  # doctest: +SKIP
    """
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale, get_transformation

    lib = _spatial.one_library(pred, library_id)
    sf = _spatial.library_entry(pred, lib).get(consts.SCALEFACTORS) or {}
    mpp = _spatial.microns_per_pixel(pred, lib)
    has_lib = consts.LIBRARY_KEY in pred.obs
    table = pred[pred.obs[consts.LIBRARY_KEY].astype(str).to_numpy() == str(lib) if has_lib else slice(None)].copy()
    if table.n_obs == 0:
        raise ValueError(f"No spot of library {lib!r} to write.")
    transformations = {"global": Identity(), "um": Scale([mpp, mpp], axes=("x", "y"))}
    images = {lib: _image_element(pred, lib, transformations)} if image else {}
    if image:
        transformations = dict(get_transformation(images[lib], get_all=True) or transformations)
    shapes_key = f"{lib}{GRID_SHAPES_SUFFIX}"
    radius = np.full(table.n_obs, float(sf.get(consts.SPOT_DIAMETER, 1.0)) / 2)
    xy = np.asarray(table.obsm[consts.SPATIAL_KEY], dtype=np.float64)
    shapes = ShapesModel.parse(xy, geometry=0, radius=radius, transformations=transformations)
    table.obs["region"] = pd.Categorical([shapes_key] * table.n_obs)
    table.obs["instance_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region=shapes_key, region_key="region", instance_key="instance_id")
    return SpatialData(images=images, shapes={shapes_key: shapes}, tables={table_key: table})


def write_spatialdata(sdata: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Write a SpatialData to a ``.zarr`` store with spatialdata's writer, whole or not at all.

    It is written beside ``path`` and then moved there, so a failed write leaves ``path`` as it was.

    Examples
    --------
    >>> write_spatialdata(sdata, "slide_predicted.zarr")  # doctest: +SKIP
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp, old = path.with_name(f".{path.name}.{tag}.tmp.zarr"), path.with_name(f".{path.name}.{tag}.old")
    try:
        sdata.write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    sdata.path = path
    return path
