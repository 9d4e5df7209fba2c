"""The elements of a SpatialData object that a slide is read from: its table and image, the image's scale levels."""

from __future__ import annotations

import numpy as np

from agl_scverse import _spatial
from agl_scverse._images import scale_levels as scale_levels  # re-exported for the SpatialData readers
from agl_scverse._spatial import coordinate_systems as coordinate_systems

from ._common import thumbnail_from_array

SD_ATTRS = "spatialdata_attrs"
#: Names of coordinate systems taken to be in µm (spatialdata does not store axis units).
UM_COORDINATE_SYSTEMS = ("um", "µm", "micron", "microns", "micrometer", "micrometers", "micrometre", "micrometres")


def affine(element, cs: str) -> np.ndarray:
    """3 x 3 affine (x, y) of an element's transformation to coordinate system ``cs``."""
    from spatialdata.transformations import get_transformation

    tr = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(tr.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def um_scale(image, image_name: str, um_cs: str | None = None) -> tuple[float, str] | None:
    """µm per image pixel from a coordinate system in µm (``um_cs``, else one named like µm) and its source, or None."""
    systems = coordinate_systems(image)
    if um_cs is not None:
        if um_cs not in systems:
            raise ValueError(
                f"um_coordinate_system={um_cs!r} is not a coordinate system of image {image_name!r} ({systems})."
            )
        um_list = [um_cs]
    else:
        um_list = [cs for cs in systems if cs.lower() in UM_COORDINATE_SYSTEMS or cs.lower().endswith(("_um", "_µm"))]
    if not um_list:
        return None
    mpp = float(np.sqrt(abs(np.linalg.det(affine(image, um_list[0])[:2, :2]))))
    return mpp, f"transformation of {image_name!r} to µm system {um_list[0]!r}"


def is_backed(sdata, image_name: str) -> bool:
    """Whether the image element is stored in the SpatialData's zarr store (so it can be reopened from there)."""
    try:
        paths = set(sdata.elements_paths_on_disk() or [])
    except Exception:  # older spatialdata or an in-memory object
        return False
    return image_name in paths or f"images/{image_name}" in paths


def table_regions(table) -> list[str]:
    """The elements a table annotates (``uns["spatialdata_attrs"]["region"]``) as a list."""
    region = (table.uns.get(SD_ATTRS) or {}).get("region")
    return [region] if isinstance(region, str) else list(region if region is not None else [])


def pick_table(sdata, table_key: str | None):
    tables = dict(sdata.tables)
    if not tables:
        raise ValueError("The SpatialData object has no table: add the counts as a table annotating the spot shapes.")
    if table_key is not None:
        if table_key not in tables:
            raise KeyError(f"table_key={table_key!r} is not a table; available tables: {list(tables)}.")
        return table_key, tables[table_key]
    if len(tables) == 1:
        return next(iter(tables.items()))
    on_shapes = [key for key, t in tables.items() if any(r in sdata.shapes for r in table_regions(t))]
    if len(on_shapes) == 1:
        return on_shapes[0], tables[on_shapes[0]]
    raise ValueError(f"The SpatialData object has several tables {list(tables)}; pass table_key=<one>.")


def pick_image(sdata, image_key: str | None):
    images = dict(sdata.images)
    if not images:
        raise ValueError(
            "No image element in the SpatialData object: an H&E image is needed (add one with "
            "spatialdata.models.Image2DModel)."
        )
    if image_key is not None:
        if image_key not in images:
            raise KeyError(f"image_key={image_key!r} is not an image element; available images: {list(images)}.")
        return image_key, images[image_key]
    if len(images) > 1:
        raise ValueError(f"The SpatialData object has several images {list(images)}; pass image_key=<the H&E>.")
    return next(iter(images.items()))


def to_rgb(arr, name: str) -> np.ndarray:
    """(c, y, x) DataArray -> (y, x, c) uint8 RGB numpy array."""
    data = np.asarray(arr.transpose("y", "x", "c").values)
    return _spatial.as_rgb(data, name=f"image {name!r}")


def hires_thumbnail(levels: list, full_width: int, max_px: int, name: str) -> tuple[np.ndarray, float]:
    """Thumbnail from the coarsest scale level that is still at least ``max_px`` on its longest side."""
    level = levels[0]
    for lv in levels[1:]:
        if max(lv.sizes["y"], lv.sizes["x"]) >= max_px:
            level = lv
    level_scale = level.sizes["x"] / full_width
    f = int(max(1, np.floor(max(level.sizes["y"], level.sizes["x"]) / (2 * max_px))))
    if f > 1:  # very large single-scale image: block-average lazily before computing
        level = level.coarsen(y=f, x=f, boundary="trim").mean()
        level_scale /= f
    img, s = thumbnail_from_array(to_rgb(level, name), max_px, name=f"image {name!r}")
    return img, float(level_scale * s)
