"""Conversion of a SpatialData object (table annotating circle shapes + an H&E image) to the agl-scverse layout."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as K
from agl_scverse import _spatial, _validate

from ._common import as_csr_float32, check_in_image, finalize, positive_number, spatial_entry, thumbnail_from_array

__all__ = ["as_anndata", "from_spatialdata", "update_table"]

SD_ATTRS = "spatialdata_attrs"


def from_spatialdata(
    sdata: Any,
    table_key: str | None = None,
    image_key: str | None = None,
    shapes_key: str | None = None,
    library_id: str | None = None,
    microns_per_pixel: float | None = None,
    library_key: str = K.LIBRARY_KEY,
    layer: str | None = None,
    spot_diameter_um: float = _spatial.VISIUM_SCALEFACTOR_SPOT_UM,
    hires_max_px: int = 2000,
    fullres_max_px: int = 4096,
) -> AnnData:
    """One AnnData in the agl-scverse layout from a :class:`spatialdata.SpatialData` object.

    The table must annotate circle shapes (``table.uns["spatialdata_attrs"]`` ``region`` / ``region_key`` /
    ``instance_key``, shapes with a ``radius`` column). Spot centres and radii are mapped into the pixel grid of the
    image element with spatialdata's own transformations
    (:func:`spatialdata.transformations.get_transformation_between_coordinate_systems`), so
    ``.obsm["spatial"]`` is in full-resolution pixels of that image. ``sdata`` is left unchanged.

    Parameters
    ----------
    sdata
        The SpatialData object.
    table_key
        Table to read; default the only table (or the only one annotating shapes).
    image_key
        Image element (the H&E); default the only image element.
    shapes_key
        Shapes element annotated by the table; default the only shapes region of the table.
    library_id
        Library id; default ``image_key``.
    microns_per_pixel
        µm per pixel of the image. Default ``spot_diameter_um`` over the circle diameter in image pixels, with a
        warning (right for Visium, wrong for other platforms).
    library_key
        ``.obs`` column naming the library (categorical).
    layer
        Table layer holding the raw counts (default ``table.X``).
    spot_diameter_um
        Physical spot diameter used when ``microns_per_pixel`` is not given (65 for Visium: Space Ranger's scale factors and circles refer to a theoretical 65 µm spot).
    hires_max_px
        Longest side of the ``"hires"`` image.
    fullres_max_px
        Images whose longest side is at most this are also kept whole as ``images["fullres"]`` (patches are then
        cut at full resolution); larger ones only as ``"hires"``.

    Returns
    -------
    AnnData with the table's spots (the rows annotating ``shapes_key``), counts as CSR float32 and
    ``.uns["spatial"][library_id]`` with the images, scale factors and metadata naming the SpatialData elements.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> import spatialdata as sd
    >>> sdata = sd.read_zarr("visium.zarr")  # doctest: +SKIP
    >>> adata = agl.io.from_spatialdata(sdata, table_key="table", image_key="he")  # doctest: +SKIP
    """
    from spatialdata import SpatialData

    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a spatialdata.SpatialData object, got {type(sdata).__name__}.")
    if microns_per_pixel is not None:
        microns_per_pixel = positive_number(microns_per_pixel, "microns_per_pixel", "Pass µm per image pixel.")

    table_key, table = _pick_table(sdata, table_key)
    attrs = table.uns.get(SD_ATTRS) or {}
    regions = attrs.get("region")
    regions = [regions] if isinstance(regions, str) else list(regions if regions is not None else [])
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    if not regions or region_key is None or instance_key is None:
        raise ValueError(
            f"Table {table_key!r} does not annotate any element (uns['spatialdata_attrs'] = {attrs}). Parse it with "
            "spatialdata.models.TableModel.parse(table, region=<shapes key>, region_key=..., instance_key=...)."
        )
    shape_regions = [r for r in regions if r in sdata.shapes]
    if shapes_key is None:
        if not shape_regions:
            raise ValueError(
                f"Table {table_key!r} annotates {regions}, which are not shapes (shapes: {list(sdata.shapes)}); "
                "agl-scverse needs a table annotating circle shapes (the spots)."
            )
        if len(shape_regions) > 1:
            raise ValueError(f"Table {table_key!r} annotates several shapes {shape_regions}; pass shapes_key=<one>.")
        shapes_key = shape_regions[0]
    elif shapes_key not in sdata.shapes:
        raise KeyError(f"shapes_key={shapes_key!r} is not a shapes element; available shapes: {list(sdata.shapes)}.")
    elif shapes_key not in regions:
        raise ValueError(f"Table {table_key!r} does not annotate shapes {shapes_key!r}; it annotates {regions}.")
    shapes = sdata.shapes[shapes_key]
    if "radius" not in shapes.columns or not (shapes.geometry.geom_type == "Point").all():
        raise ValueError(
            f"Shapes {shapes_key!r} are not circles (points with a 'radius' column); agl-scverse needs spot circles."
        )

    image_key, image = _pick_image(sdata, image_key)
    levels = _levels(image)
    full = levels[0]
    channels = full.sizes.get("c", 1)
    if channels not in (3, 4):
        raise ValueError(
            f"Image {image_key!r} has {channels} channel(s); an RGB H&E image (3 channels) is required"
            + (" (this one is grayscale)." if channels == 1 else ".")
        )
    height, width = int(full.sizes["y"]), int(full.sizes["x"])

    xy, spot_diam = _spots_in_image(
        sdata, table, table_key, shapes, shapes_key, image, image_key, region_key, instance_key, width, height
    )
    mask = (table.obs[region_key].astype(str) == shapes_key).to_numpy()

    mpp_source = "given"
    if microns_per_pixel is None:
        microns_per_pixel = spot_diameter_um / spot_diam
        mpp_source = f"{spot_diameter_um:g} µm / circle diameter {spot_diam:.1f} px (assumed)"
        warnings.warn(
            f"No microns_per_pixel given; assuming {spot_diameter_um:g} µm spots, so {microns_per_pixel:.4f} µm/px "
            "from the circle diameter. Pass microns_per_pixel unless these are Visium spots.",
            UserWarning,
            stacklevel=2,
        )

    # counts: a copy of the table rows, checked before anything is built
    adata = table[mask].copy()
    if layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"layer={layer!r} is not a layer of table {table_key!r}; layers: {list(adata.layers)}.")
        adata.X = adata.layers[layer]
    _validate.check_adata(adata)

    # images
    hires, scalef = _hires(levels, width, hires_max_px, image_key)
    entry = spatial_entry(
        hires,
        scalef,
        spot_diameter_fullres=spot_diam,
        microns_per_pixel=microns_per_pixel,
        microns_per_pixel_source=mpp_source,
        spatialdata_table=table_key,
        spatialdata_image=image_key,
        spatialdata_shapes=shapes_key,
        reader="from_spatialdata",
    )
    if max(height, width) <= fullres_max_px:
        entry[K.IMAGES][K.FULLRES] = hires if scalef == 1.0 else _to_rgb(full, image_key)

    library_id = str(library_id) if library_id is not None else str(image_key)
    adata.uns.pop(SD_ATTRS, None)
    adata.obsm[K.SPATIAL_KEY] = xy
    adata.obs[library_key] = library_id
    adata.X = as_csr_float32(adata.X)
    adata.uns[K.SPATIAL_KEY] = {library_id: entry}
    finalize(adata, library_key)
    logg.info(
        f"from SpatialData: {adata.n_obs} spots x {adata.n_vars} genes (table {table_key!r}, shapes {shapes_key!r}, "
        f"image {image_key!r}, {microns_per_pixel:.4f} µm/px)"
    )
    return adata


def _spots_in_image(
    sdata, table, table_key, shapes, shapes_key, image, image_key, region_key, instance_key, width, height
) -> tuple[np.ndarray, float]:
    """Spot centres of the table's rows of ``shapes_key`` in the image's pixels, and the median spot diameter (px)."""
    from spatialdata.transformations import get_transformation_between_coordinate_systems

    # spots of this region, in table order, matched to the shapes on the instance id
    if region_key not in table.obs or instance_key not in table.obs:
        raise KeyError(f"Table {table_key!r} lacks the columns {region_key!r} / {instance_key!r} named in its attrs.")
    mask = (table.obs[region_key].astype(str) == shapes_key).to_numpy()
    if not mask.any():
        raise ValueError(f"The slide is empty: no row of table {table_key!r} annotates shapes {shapes_key!r}.")
    ids = table.obs[instance_key].to_numpy()[mask]
    pos = shapes.index.get_indexer(ids)
    if (pos < 0).any():
        raise ValueError(
            f"{int((pos < 0).sum())} rows of table {table_key!r} name instances absent from shapes {shapes_key!r} "
            f"(e.g. {list(ids[pos < 0][:3])}); the table and shapes do not match."
        )
    pts = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])[pos]
    radius = shapes["radius"].to_numpy(dtype=float)[pos]

    # shapes coordinates -> image pixel coordinates
    try:
        tr = get_transformation_between_coordinate_systems(sdata, shapes, image)
    except Exception as e:  # spatialdata raises several types when no path exists
        raise ValueError(
            f"Shapes {shapes_key!r} and image {image_key!r} share no coordinate system, so spots cannot be placed "
            f"on the image ({e}). Give both a transformation to one coordinate system."
        ) from e
    A = np.asarray(tr.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)
    xy = pts @ A[:2, :2].T + A[:2, 2]
    diam_px = 2.0 * radius * float(np.sqrt(abs(np.linalg.det(A[:2, :2]))))
    if not np.all(np.isfinite(xy)):
        raise ValueError(f"Shapes {shapes_key!r} hold NaN/inf coordinates.")
    check_in_image(xy, width, height, image_key, image=f"image {image_key!r}")
    spot_diam = positive_number(
        float(np.median(diam_px)), f"The spot diameter of {shapes_key!r} (px)", "Set a positive 'radius'."
    )
    return xy, spot_diam


def _pick_table(sdata, table_key: str | None):
    tables = dict(sdata.tables)
    if not tables:
        raise ValueError("The SpatialData object has no table: add the counts as a table annotating the spot shapes.")
    if table_key is not None:
        if table_key not in tables:
            raise KeyError(f"table_key={table_key!r} is not a table; available tables: {list(tables)}.")
        return table_key, tables[table_key]
    if len(tables) == 1:
        return next(iter(tables.items()))
    on_shapes = []
    for key, t in tables.items():
        region = (t.uns.get(SD_ATTRS) or {}).get("region")
        region = [region] if isinstance(region, str) else list(region if region is not None else [])
        if any(r in sdata.shapes for r in region):
            on_shapes.append(key)
    if len(on_shapes) == 1:
        return on_shapes[0], tables[on_shapes[0]]
    raise ValueError(f"The SpatialData object has several tables {list(tables)}; pass table_key=<one>.")


def _pick_image(sdata, image_key: str | None):
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


def _levels(image) -> list:
    """The scale levels of an image element as DataArrays (c, y, x), full resolution first."""
    import xarray as xr

    if isinstance(image, xr.DataArray):
        return [image]
    out = []
    for key in sorted(image.keys(), key=lambda k: int("".join(ch for ch in k if ch.isdigit()) or 0)):
        ds = image[key].ds
        out.append(ds[next(iter(ds.data_vars))])
    return out


def _to_rgb(arr, name: str) -> np.ndarray:
    """(c, y, x) DataArray -> (y, x, c) uint8 RGB numpy array."""
    data = np.asarray(arr.transpose("y", "x", "c").values)
    return _spatial.as_rgb(data, name=f"image {name!r}")


def _hires(levels: list, full_width: int, max_px: int, name: str) -> tuple[np.ndarray, float]:
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
    img, s = thumbnail_from_array(_to_rgb(level, name), max_px, name=f"image {name!r}")
    return img, float(level_scale * s)


# ------------------------------------------------------------------------------------------------ tool I/O
def as_anndata(data: Any, table_key: str | None = None) -> AnnData:
    """The AnnData a tool works on: an AnnData as is, a SpatialData through :func:`from_spatialdata`.

    Examples
    --------
    >>> import anndata as ad
    >>> a = ad.AnnData(np.ones((2, 1)))
    >>> as_anndata(a) is a
    True
    """
    if isinstance(data, AnnData):
        return data
    from spatialdata import SpatialData

    if isinstance(data, SpatialData):
        return from_spatialdata(data, table_key=table_key)
    raise TypeError(f"Expected an AnnData or a SpatialData object, got {type(data).__name__}.")


def update_table(
    sdata: Any,
    adata: AnnData,
    *,
    var: Sequence[str] = (),
    obs: Sequence[str] = (),
    obsm: Sequence[str] = (),
    layers: Sequence[str] = (),
    uns: Sequence[str] = (),
) -> str:
    """Write what a tool wrote into ``adata`` (made by :func:`from_spatialdata`) back into the SpatialData's table.

    ``.var`` columns and ``.uns`` entries are copied as they are; ``.obs`` columns, ``.obsm`` arrays and
    ``.layers`` are aligned on the spot names, so table rows that ``adata`` does not hold (other regions) get
    missing values (NaN). Returns the table's key. Like squidpy, tools given a SpatialData write into its table,
    so ``sdata.write()`` keeps the results.

    Examples
    --------
    >>> update_table(sdata, adata, var=["agl_role"], uns=["agl"])  # doctest: +SKIP
    'table'
    """
    libs = list((adata.uns.get(K.SPATIAL_KEY) or {}).values())
    table_key = (libs[0].get(K.METADATA) or {}).get("spatialdata_table") if libs else None
    if table_key is None or table_key not in sdata.tables:
        raise KeyError("Cannot find the SpatialData table this AnnData was read from (metadata 'spatialdata_table').")
    table = sdata.tables[table_key]
    rows = table.obs_names.get_indexer(adata.obs_names)
    if (rows < 0).any():
        raise ValueError(f"{int((rows < 0).sum())} spots of the AnnData are not rows of table {table_key!r}.")
    full = len(rows) == table.n_obs and bool((rows == np.arange(table.n_obs)).all())
    cols = table.var_names.get_indexer(adata.var_names)
    same_var = len(cols) == table.n_vars and bool((cols == np.arange(table.n_vars)).all())

    def rows_of(arr: np.ndarray) -> np.ndarray:
        if full:
            return arr
        out = np.full((table.n_obs, *arr.shape[1:]), np.nan, dtype=np.result_type(arr.dtype, np.float32))
        out[rows] = arr
        return out

    for key in var:
        if same_var:
            table.var[key] = adata.var[key].to_numpy()
        else:
            table.var[key] = adata.var[key].reindex(table.var_names).to_numpy()
    for key in obs:
        col = adata.obs[key]
        table.obs[key] = (
            col.to_numpy()
            if full
            else pd.Series(col.to_numpy(), index=adata.obs_names).reindex(table.obs_names).to_numpy()
        )
        if isinstance(col.dtype, pd.CategoricalDtype):
            table.obs[key] = pd.Categorical(table.obs[key], categories=col.cat.categories)
    for key in obsm:
        table.obsm[key] = rows_of(np.asarray(adata.obsm[key]))
    for key in layers:
        if not same_var:
            raise ValueError(f"Layer {key!r} cannot be written back: the table has other genes than the AnnData.")
        table.layers[key] = rows_of(np.asarray(adata.layers[key]))
    for key in uns:
        table.uns[key] = adata.uns[key]
    return table_key
