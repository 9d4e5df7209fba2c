"""Conversion of a SpatialData object (table annotating circle shapes + an H&E image) to the agl-scverse layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse import _spatial, _validate
from agl_scverse._images import register_live_image

from ._common import as_csr_float32, check_in_image, finalize, positive_number, spatial_entry
from ._sd_elements import (
    SD_ATTRS,
    affine,
    coordinate_systems,
    hires_thumbnail,
    is_backed,
    pick_image,
    pick_table,
    scale_levels,
    table_regions,
    to_rgb,
    um_scale,
)

__all__ = ["as_anndata", "from_spatialdata", "update_table"]

#: Relative tolerance when comparing the mappings of several shared coordinate systems.
_SAME_MAPPING_RTOL = 1e-6


def from_spatialdata(
    sdata: Any,
    table_key: str | None = None,
    image_key: str | Mapping[str, str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    library_id: str | Mapping[str, str] | None = None,
    microns_per_pixel: float | Mapping[str, float] | None = None,
    library_key: str = consts.LIBRARY_KEY,
    layer: str | None = None,
    spot_diameter_um: float | None = None,
    hires_max_px: int = 2000,
    fullres_max_px: int = 4096,
    *,
    coordinate_system: str | None = None,
    um_coordinate_system: str | None = None,
) -> AnnData:
    """One AnnData in the agl-scverse layout from a :class:`spatialdata.SpatialData` object.

    The table must annotate circle shapes (shapes with a ``radius`` column). Every shapes element it annotates is
    one library (a section) with its ``.uns["spatial"]`` entry. Spot centres and radii are mapped into the pixels of
    the section's image element with spatialdata's transformations; patches are later read from that element
    lazily (:class:`agl_scverse.pp.SpotPatches`). ``sdata`` is left unchanged.

    Parameters
    ----------
    sdata
        The SpatialData object.
    table_key
        Table to read; default the only table (or the only one annotating shapes).
    image_key
        Image element (the H&E) of every section, or a ``{shapes key: image key}`` mapping. Default: per section,
        the finest image sharing a coordinate system with its shapes (logged).
    shapes_key
        Shapes element(s) to read; default every shapes region the table annotates.
    library_id
        Library id (one section) or a ``{shapes key: library id}`` mapping. Default: the image key when the table
        annotates one section, the shapes key when it annotates several.
    microns_per_pixel
        µm per pixel of the image element (one number, or a ``{shapes key: number}`` mapping). Default: from a
        coordinate system in µm, the table's ``uns["spatial"]`` scale factors (``microns_per_pixel`` or Space
        Ranger's ``spot_diameter_fullres``), or ``spot_diameter_um``; else a ValueError.
    library_key
        ``.obs`` column naming the library (categorical).
    layer
        Table layer holding the raw counts (default ``table.X``).
    spot_diameter_um
        Physical diameter of the circles (55 for Visium, 100 for legacy ST), for the scale when nothing else gives it.
    hires_max_px
        Longest side of the ``"hires"`` thumbnail (plots).
    fullres_max_px
        Images whose longest side is at most this are also kept whole as ``images["fullres"]``.
    coordinate_system
        Coordinate system through which spots are placed on the image. Default: any the shapes and the image
        share (a ValueError when they disagree); recorded in ``metadata["spatialdata_coordinate_system"]``.
    um_coordinate_system
        A coordinate system in µm; default one named ``"um"``, ``"µm"``, ``"microns"`` ... if the image has one.

    Returns
    -------
    AnnData of the sections' spots (table order), counts as CSR float32 and ``.uns["spatial"][library_id]`` with
    a thumbnail, scale factors and metadata naming the SpatialData elements.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> import spatialdata as sd
    >>> sdata = sd.read_zarr("visium.zarr")  # doctest: +SKIP
    >>> adata = agl.io.from_spatialdata(sdata, table_key="table", microns_per_pixel=0.26)  # doctest: +SKIP
    """
    from spatialdata import SpatialData

    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a spatialdata.SpatialData object, got {type(sdata).__name__}.")
    if spot_diameter_um is not None:
        spot_diameter_um = positive_number(spot_diameter_um, "spot_diameter_um", "Pass the circles' diameter in µm.")

    table_key, table = pick_table(sdata, table_key)
    attrs = table.uns.get(SD_ATTRS) or {}
    regions = table_regions(table)
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    if not regions or region_key is None or instance_key is None:
        raise ValueError(
            f"Table {table_key!r} does not annotate any element (uns['spatialdata_attrs'] = {attrs}). Parse it with "
            "spatialdata.models.TableModel.parse(table, region=<shapes key>, region_key=..., instance_key=...)."
        )
    if region_key not in table.obs or instance_key not in table.obs:
        raise KeyError(f"Table {table_key!r} lacks the columns {region_key!r} / {instance_key!r} named in its attrs.")
    shape_regions = [r for r in regions if r in sdata.shapes]
    if shapes_key is None:
        if not shape_regions:
            raise ValueError(
                f"Table {table_key!r} annotates {regions}, which are not shapes (shapes: {list(sdata.shapes)}); "
                "agl-scverse needs a table annotating circle shapes (the spots)."
            )
        sections = shape_regions
    else:
        sections = [shapes_key] if isinstance(shapes_key, str) else [str(k) for k in shapes_key]
        for key in sections:
            if key not in sdata.shapes:
                raise KeyError(f"shapes_key={key!r} is not a shapes element; available shapes: {list(sdata.shapes)}.")
            if key not in regions:
                raise ValueError(f"Table {table_key!r} does not annotate shapes {key!r}; it annotates {regions}.")
    fix = "Pass µm per image pixel."
    if isinstance(microns_per_pixel, Mapping):
        mpp_given = {str(k): positive_number(v, f"microns_per_pixel[{k!r}]", fix) for k, v in microns_per_pixel.items()}
    else:
        mpp = None if microns_per_pixel is None else positive_number(microns_per_pixel, "microns_per_pixel", fix)
        mpp_given = {} if mpp is None else dict.fromkeys(sections, mpp)
    lib_ids = _library_ids(sections, library_id, image_key)

    region_col = table.obs[region_key].astype(str).to_numpy()
    keep = np.isin(region_col, sections)
    if not keep.any():
        raise ValueError(f"The slide is empty: no row of table {table_key!r} annotates shapes {sections}.")
    # counts: a copy of the table rows, checked before anything is built
    adata = table[keep].copy()
    if layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"layer={layer!r} is not a layer of table {table_key!r}; layers: {list(adata.layers)}.")
        adata.X = adata.layers[layer]
    _validate.check_adata(adata)

    xy = np.zeros((adata.n_obs, 2), dtype=float)
    libs = np.empty(adata.n_obs, dtype=object)
    spatial: dict[str, dict] = {}
    rows_region = region_col[keep]
    opts = (image_key, spot_diameter_um, coordinate_system, um_coordinate_system, hires_max_px, fullres_max_px)
    for shapes_name in sections:
        rows = rows_region == shapes_name
        if not rows.any():
            raise ValueError(f"The slide is empty: no row of table {table_key!r} annotates shapes {shapes_name!r}.")
        ids = adata.obs[instance_key].to_numpy()[rows]
        mpp = mpp_given.get(shapes_name)
        xy[rows], entry = _read_section(sdata, table, table_key, ids, shapes_name, mpp, lib_ids[shapes_name], opts)
        lib = lib_ids[shapes_name] = lib_ids[shapes_name] or entry[consts.METADATA][consts.SPATIALDATA_IMAGE]
        if lib in spatial:
            raise ValueError(f"Two sections get library id {lib!r}; pass library_id={{shapes key: id}}.")
        spatial[lib] = entry
        libs[rows] = lib

    adata.uns.pop(SD_ATTRS, None)
    adata.obsm[consts.SPATIAL_KEY] = xy
    adata.obs[library_key] = pd.Categorical(libs.astype(str), categories=[lib_ids[k] for k in sections])
    adata.X = as_csr_float32(adata.X)
    adata.uns[consts.SPATIAL_KEY] = spatial
    finalize(adata, library_key)
    logg.info(
        f"from SpatialData: {adata.n_obs} spots x {adata.n_vars} genes from table {table_key!r}, "
        f"{len(sections)} section(s): "
        + "; ".join(
            f"{lib}: shapes {e[consts.METADATA]['spatialdata_shapes']!r} on image {e[consts.METADATA][consts.SPATIALDATA_IMAGE]!r} "
            f"via {e[consts.METADATA]['spatialdata_coordinate_system']!r}, "
            f"{e[consts.SCALEFACTORS][consts.MICRONS_PER_PIXEL]:.4f} µm/px ({e[consts.METADATA][consts.MICRONS_PER_PIXEL_SOURCE]})"
            for lib, e in spatial.items()
        )
    )
    return adata


def _library_ids(sections: list[str], library_id, image_key) -> dict[str, str]:
    if isinstance(library_id, Mapping):
        missing = [k for k in sections if k not in library_id]
        if missing:
            raise KeyError(f"library_id has no entry for shapes {missing}; give one id per section.")
        return {k: str(library_id[k]) for k in sections}
    if library_id is not None:
        if len(sections) > 1:
            raise ValueError(
                f"library_id={library_id!r} names one library, but the table annotates {len(sections)} sections "
                f"{sections}; pass a {{shapes key: library id}} mapping or leave it out (the shapes keys)."
            )
        return {sections[0]: str(library_id)}
    if len(sections) == 1:
        img = image_key.get(sections[0]) if isinstance(image_key, Mapping) else image_key
        return {sections[0]: str(img) if img is not None else ""}  # "" -> the image key, filled in below
    return {k: k for k in sections}


def _shapes_to_image(shapes, shapes_name, image, image_name, coordinate_system) -> tuple[np.ndarray, str, list[str]]:
    """The affine from shapes coordinates to image pixels, the coordinate system used, and all shared ones."""
    shared = [cs for cs in coordinate_systems(shapes) if cs in set(coordinate_systems(image))]
    if coordinate_system is not None and coordinate_system not in shared:
        raise ValueError(
            f"coordinate_system={coordinate_system!r} is not shared by shapes {shapes_name!r} and image "
            f"{image_name!r} (shared: {shared})."
        )
    shared_try = shared if coordinate_system is None else [coordinate_system]
    if not shared_try:
        raise ValueError(
            f"Shapes {shapes_name!r} (coordinate systems {coordinate_systems(shapes)}) and image {image_name!r} "
            f"({coordinate_systems(image)}) share no coordinate system, so spots cannot be placed on the image. "
            "Give both a transformation to one coordinate system (spatialdata.transformations.set_transformation)."
        )
    maps = {}
    for cs in shared_try:
        A_img = affine(image, cs)
        if abs(np.linalg.det(A_img[:2, :2])) >= 1e-12:
            maps[cs] = np.linalg.inv(A_img) @ affine(shapes, cs)
    if not maps:
        raise ValueError(f"Image {image_name!r} has a singular transformation to {shared_try}.")
    first_cs, first = sorted(maps)[0], maps[sorted(maps)[0]]
    differ = [cs for cs, M in maps.items() if not np.allclose(M, first, rtol=_SAME_MAPPING_RTOL, atol=1e-6)]
    if differ:
        raise ValueError(
            f"Shapes {shapes_name!r} and image {image_name!r} share coordinate systems {sorted(maps)} that place the "
            f"spots differently on the image ({first_cs!r} vs {differ}); pass coordinate_system=<the right one>."
        )
    return first, first_cs, sorted(maps)


def _candidate_images(sdata, shapes) -> list[str]:
    own = set(coordinate_systems(shapes))
    return [k for k, im in sdata.images.items() if own & set(coordinate_systems(im))]


def _image_for(sdata, shapes, shapes_name, image_key, coordinate_system, pts) -> tuple[str, Any]:
    key = image_key.get(shapes_name) if isinstance(image_key, Mapping) else image_key
    if key is not None:
        return pick_image(sdata, key)
    if not sdata.images:
        return pick_image(sdata, None)  # the "no image" error
    cands = _candidate_images(sdata, shapes)
    if not cands:
        raise ValueError(
            f"No image element shares a coordinate system with shapes {shapes_name!r} "
            f"({coordinate_systems(shapes)}); images: {list(sdata.images)}. Pass image_key= and give both a "
            "transformation to one coordinate system."
        )
    if len(cands) == 1:
        return cands[0], sdata.images[cands[0]]
    # several: the finest (image pixels per shapes unit) of those all the spots fall on
    density = {}
    for k in cands:
        try:
            M, _, _ = _shapes_to_image(shapes, shapes_name, sdata.images[k], k, coordinate_system)
        except ValueError:
            continue
        lv = scale_levels(sdata.images[k])[0]
        xy = pts @ M[:2, :2].T + M[:2, 2]
        inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < lv.sizes["x"]) & (xy[:, 1] < lv.sizes["y"])
        if inside.all():
            density[k] = abs(np.linalg.det(M[:2, :2]))
    if not density:
        raise ValueError(
            f"The spots of shapes {shapes_name!r} do not all fall on any one of the images {cands} sharing a "
            "coordinate system with them; pass image_key=<the H&E of that section> (or coordinate_system=)."
        )
    best = max(density, key=lambda k: density[k])
    logg.info(
        f"shapes {shapes_name!r}: images {cands} share a coordinate system; using {best!r}, the finest the spots "
        "fall on (pass image_key= to choose)."
    )
    return best, sdata.images[best]


def _table_scalefactors(table, names: Sequence[str]) -> dict:
    spatial = table.uns.get(consts.SPATIAL_KEY) or {}
    if not isinstance(spatial, Mapping):
        return {}
    found = [spatial[n] for n in names if isinstance(spatial.get(n), Mapping)]
    found = found or (list(spatial.values()) if len(spatial) == 1 else [])
    return dict(found[0].get(consts.SCALEFACTORS) or {}) if found and isinstance(found[0], Mapping) else {}


def _microns_per_pixel(
    given, image, image_name, table, shapes_name, lib, lin, spot_diam_px, spot_diameter_um, um_cs
) -> tuple[float, str]:
    """µm per image pixel and where it came from; a ValueError when nothing gives it."""
    if given is not None:
        return float(given), "given"
    from_um = um_scale(image, image_name, um_cs)
    if from_um is not None:
        return from_um
    sf = _table_scalefactors(table, [lib, shapes_name, image_name])
    if consts.MICRONS_PER_PIXEL in sf:
        val = positive_number(sf[consts.MICRONS_PER_PIXEL], "table.uns['spatial'] microns_per_pixel", "Fix the table.")
        # recorded per pixel of the shapes' (full-resolution) grid: one image pixel spans 1/lin of them
        return val / lin, "table metadata microns_per_pixel"
    if consts.SPOT_DIAMETER in sf:
        d = positive_number(sf[consts.SPOT_DIAMETER], "table.uns['spatial'] spot_diameter_fullres", "Fix the table.")
        mpp = _spatial.VISIUM_SCALEFACTOR_SPOT_UM / d / lin
        return mpp, f"Space Ranger spot_diameter_fullres ({d:g} px = {_spatial.VISIUM_SCALEFACTOR_SPOT_UM:g} µm)"
    if spot_diameter_um is not None:
        return spot_diameter_um / spot_diam_px, f"{spot_diameter_um:g} µm / circle diameter {spot_diam_px:.1f} px"
    raise ValueError(
        f"The physical scale of image {image_name!r} (section {shapes_name!r}) is unknown: no coordinate system in µm "
        f"(its systems: {coordinate_systems(image)}), no microns_per_pixel or spot_diameter_fullres in "
        "table.uns['spatial']. Pass "
        "microns_per_pixel=<µm per pixel of that image> (a number or {shapes key: number}), um_coordinate_system=, "
        "or spot_diameter_um=<the circles' diameter in µm> (55 for Visium spots, 100 for legacy ST) to "
        "agl.io.from_spatialdata; or store it in the SpatialData, which the tools read: a transformation of the image "
        "to a coordinate system named 'um', or table.uns['spatial'][<shapes key>]['scalefactors']"
        "['microns_per_pixel'] (µm per unit of the shapes' coordinates)."
    )


def _read_section(sdata, table, table_key, ids, shapes_name, mpp_given, lib, opts: tuple) -> tuple[np.ndarray, dict]:
    """Spot centres (image pixels) of one section's table rows and its ``uns['spatial']`` entry."""
    image_key, spot_diameter_um, coordinate_system, um_cs, hires_max_px, fullres_max_px = opts
    shapes = sdata.shapes[shapes_name]
    if "radius" not in shapes.columns or not (shapes.geometry.geom_type == "Point").all():
        raise ValueError(
            f"Shapes {shapes_name!r} are not circles (points with a 'radius' column); agl-scverse needs spot circles."
        )
    pos = shapes.index.get_indexer(ids)
    if (pos < 0).any():
        raise ValueError(
            f"{int((pos < 0).sum())} rows of table {table_key!r} name instances absent from shapes {shapes_name!r} "
            f"(e.g. {list(ids[pos < 0][:3])}); the table and shapes do not match."
        )
    pts = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])[pos]
    radius = shapes["radius"].to_numpy(dtype=float)[pos]
    image_name, image = _image_for(sdata, shapes, shapes_name, image_key, coordinate_system, pts)
    levels = scale_levels(image)
    full = levels[0]
    channels = full.sizes.get("c", 1)
    if channels not in (3, 4):
        raise ValueError(
            f"Image {image_name!r} has {channels} channel(s); an RGB H&E image (3 channels) is required"
            + (" (this one is grayscale)." if channels == 1 else ".")
        )
    height, width = int(full.sizes["y"]), int(full.sizes["x"])
    M, cs, shared = _shapes_to_image(shapes, shapes_name, image, image_name, coordinate_system)
    if len(shared) > 1:
        logg.info(
            f"shapes {shapes_name!r} -> image {image_name!r}: coordinate systems {shared} give the same mapping; "
            f"using {cs!r}."
        )
    xy = pts @ M[:2, :2].T + M[:2, 2]
    lin = float(np.sqrt(abs(np.linalg.det(M[:2, :2]))))  # image pixels per shapes unit
    diam_px = 2.0 * radius * lin
    if not np.all(np.isfinite(xy)):
        raise ValueError(f"Shapes {shapes_name!r} hold NaN/inf coordinates.")
    check_in_image(xy, width, height, shapes_name, image=f"image {image_name!r}")
    spot_diam = positive_number(
        float(np.median(diam_px)), f"The spot diameter of {shapes_name!r} (px)", "Set a positive 'radius'."
    )
    mpp, mpp_source = _microns_per_pixel(
        mpp_given, image, image_name, table, shapes_name, lib or image_name, lin, spot_diam, spot_diameter_um, um_cs
    )
    hires, scalef = hires_thumbnail(levels, width, hires_max_px, image_name)
    meta = {
        consts.MICRONS_PER_PIXEL_SOURCE: mpp_source,
        "spatialdata_table": table_key,
        consts.SPATIALDATA_IMAGE: image_name,
        "spatialdata_shapes": shapes_name,
        "spatialdata_coordinate_system": cs,
        consts.SPATIALDATA_IMAGE_TOKEN: register_live_image(image),
        "reader": "from_spatialdata",
    }
    sf_table = _table_scalefactors(table, [lib or image_name, shapes_name, image_name])
    if consts.SPOT_DIAMETER in sf_table and lin < 0.99:
        # Space Ranger metadata: shapes in full-res pixels, and this image is a downscaled copy (hires / lowres)
        meta[consts.SPATIALDATA_DOWNSCALED] = True
        logg.info(
            f"image {image_name!r} is downscaled from the full-resolution grid of shapes {shapes_name!r} "
            f"({lin:.3g} x); patches from it need allow_lowres=True."
        )
    if getattr(sdata, "path", None) is not None and is_backed(sdata, image_name):
        meta[consts.SPATIALDATA_PATH] = str(Path(sdata.path).resolve())
    entry = spatial_entry(hires, scalef, spot_diameter_fullres=spot_diam, microns_per_pixel=mpp, **meta)
    if max(height, width) <= fullres_max_px and not meta.get(consts.SPATIALDATA_DOWNSCALED):
        entry[consts.IMAGES][consts.FULLRES] = hires if scalef == 1.0 else to_rgb(full, image_name)
    return xy, entry


# ------------------------------------------------------------------------------------------------ tool I/O
def as_anndata(data: Any, table_key: str | None = None) -> AnnData:
    """The AnnData a tool works on: an AnnData as is, a SpatialData through :func:`from_spatialdata`."""
    if isinstance(data, AnnData):
        return data
    from spatialdata import SpatialData

    if isinstance(data, SpatialData):
        return from_spatialdata(data, table_key=table_key)
    raise TypeError(f"Expected an AnnData or a SpatialData object, got {type(data).__name__}.")


def tool_return(data: Any, target: AnnData, copy: bool, **written: Sequence[str]) -> AnnData | None:
    """What a tool returns: ``target`` with ``copy=True``, else None once ``written`` is in a SpatialData's table."""
    if copy:
        return target
    if target is not data:  # a SpatialData: write into its table
        update_table(data, target, **written)
    return None


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
    """Write what a tool wrote into ``adata`` (made by :func:`from_spatialdata`) back into the SpatialData's table."""
    libs = list((adata.uns.get(consts.SPATIAL_KEY) or {}).values())
    table_key = (libs[0].get(consts.METADATA) or {}).get("spatialdata_table") if libs else None
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
        table.var[key] = (adata.var[key] if same_var else adata.var[key].reindex(table.var_names)).to_numpy()
    for key in obs:
        col = adata.obs[key]
        series = pd.Series(col.to_numpy(), index=adata.obs_names)
        table.obs[key] = (series if full else series.reindex(table.obs_names)).to_numpy()
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
