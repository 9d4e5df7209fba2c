"""Access to slides, images and physical scale in the AnnData layout of :mod:`agl_scverse._constants`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from . import _constants as consts
from ._images import ImageSource, check_rgb_shape, live_image, open_image, to_uint8_rgb, value_scale

VISIUM_SPOT_UM = 55.0  # physical diameter of a Visium spot
# Space Ranger defines scalefactors["spot_diameter_fullres"] as the pixels spanning a *theoretical 65 µm* spot,
# so µm per full-res pixel = 65 / spot_diameter_fullres (not 55 / ...).
VISIUM_SCALEFACTOR_SPOT_UM = 65.0


def library_ids(adata: AnnData, library_key: str | None = None) -> list[str]:
    """Library ids present in ``adata``: categories of ``obs[library_key]`` or the keys of ``uns['spatial']``."""
    if library_key is not None:
        return [str(x) for x in pd_unique(_obs_column(adata, library_key))]
    libs = list(adata.uns.get(consts.SPATIAL_KEY, {}).keys())
    if len(libs) == 0:
        raise KeyError(
            "adata.uns['spatial'] holds no library: no image or scale factors. Read the slide with agl.io "
            "or add uns['spatial'][library_id] = {'images': ..., 'scalefactors': ...}."
        )
    if len(libs) > 1:
        raise ValueError(
            f"adata.uns['spatial'] holds several libraries {libs}; pass library_key=<obs column naming them>."
        )
    return [str(libs[0])]


def _obs_column(adata: AnnData, library_key: str) -> pd.Series:
    if library_key not in adata.obs:
        raise KeyError(
            f"library_key={library_key!r} is not a column of adata.obs; columns are {list(adata.obs.columns)}."
        )
    return adata.obs[library_key]


def pd_unique(values) -> list:
    """Unique values in order of appearance (categories first if categorical)."""
    s = pd.Series(values)
    if isinstance(s.dtype, pd.CategoricalDtype):
        present = set(s.dropna().unique())
        return [c for c in s.cat.categories if c in present]
    return list(s.dropna().unique())


def spot_masks(adata: AnnData, library_key: str | None = None) -> dict[str, np.ndarray]:
    """Boolean mask of the spots of each library."""
    libs = library_ids(adata, library_key)
    if library_key is None:
        return {libs[0]: np.ones(adata.n_obs, dtype=bool)}
    col = adata.obs[library_key].astype(str).to_numpy()
    return {lib: col == lib for lib in libs}


def one_library(adata: AnnData, library_id: str | None = None) -> str:
    """The library of ``.uns["spatial"]`` a single-slide tool works on: ``library_id``, or the only one there is."""
    libs = list((adata.uns.get(consts.SPATIAL_KEY) or {}).keys())
    if library_id is None:
        if len(libs) != 1:
            raise ValueError(f"The AnnData holds {len(libs)} libraries {libs}; pass library_id=<one of them>.")
        return libs[0]
    if library_id not in libs:
        raise KeyError(f"No library {library_id!r} in .uns['spatial'] (libraries: {libs}).")
    return library_id


def library_entry(adata: AnnData, library_id: str) -> dict:
    """The ``uns['spatial'][library_id]`` dict, with a clear error if absent."""
    spatial = adata.uns.get(consts.SPATIAL_KEY, {})
    if library_id not in spatial:
        raise KeyError(
            f"No image for library {library_id!r}: adata.uns['spatial'] has {list(spatial)}. "
            "Each library in obs[library_key] needs uns['spatial'][library_id] with 'images' and 'scalefactors'."
        )
    return spatial[library_id]


def scalefactors(adata: AnnData, library_id: str) -> dict:
    """Scale factors of a library; each present factor must be a finite positive number."""
    sf = dict(library_entry(adata, library_id).get(consts.SCALEFACTORS, {}))
    for key, val in sf.items():
        try:
            ok = np.isfinite(float(val)) and float(val) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"Scale factor {key!r} of library {library_id!r} is {val!r}; it must be a positive number. "
                "Fix uns['spatial'][library_id]['scalefactors']."
            )
    return sf


def microns_per_pixel(adata: AnnData, library_id: str) -> float:
    """µm per full-resolution pixel of a library."""
    sf = scalefactors(adata, library_id)
    if consts.MICRONS_PER_PIXEL in sf:
        return float(sf[consts.MICRONS_PER_PIXEL])
    if consts.SPOT_DIAMETER in sf:
        warnings.warn(
            f"Library {library_id!r} records no 'microns_per_pixel'; assuming Space Ranger's 65 µm reference spot "
            f"(spot_diameter_fullres={sf[consts.SPOT_DIAMETER]}). Set scalefactors['microns_per_pixel'] to silence this.",
            UserWarning,
            stacklevel=2,
        )
        return VISIUM_SCALEFACTOR_SPOT_UM / float(sf[consts.SPOT_DIAMETER])
    raise ValueError(
        f"Library {library_id!r} has neither 'microns_per_pixel' nor 'spot_diameter_fullres' in its scale factors: "
        "the physical scale is unknown. Add scalefactors['microns_per_pixel']."
    )


def as_rgb(img: np.ndarray, name: str = "image") -> np.ndarray:
    """Check an image is H x W x 3 (RGBA loses alpha) and return it as uint8 RGB."""
    img = np.asarray(img)
    check_rgb_shape(img.shape, name)
    scale = 1.0
    rgb = img[..., :3]
    if img.size and img.dtype not in (np.uint8, np.uint16) and img.dtype != bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN image
            lo, hi = float(np.nanmin(rgb)), float(np.nanmax(rgb))
        scale = value_scale(img.dtype, lo, hi, name) if np.isfinite(hi) else 1.0
    return to_uint8_rgb(img, scale)


def get_image(
    adata: AnnData,
    library_id: str,
    prefer: Sequence[str] = (consts.FULLRES, consts.HIRES, consts.LOWRES),
    warn: bool = True,
) -> tuple[ImageSource, float, str]:
    """Best available image of a library, as a source read by region (nothing is decoded here)."""
    entry = library_entry(adata, library_id)
    images = entry.get(consts.IMAGES, {}) or {}
    meta = entry.get(consts.METADATA, {}) or {}
    sf = scalefactors(adata, library_id)
    for which in prefer:
        if which == consts.FULLRES:
            path = meta.get(consts.SOURCE_IMAGE_PATH)
            if path:
                if not Path(str(path)).exists():
                    raise FileNotFoundError(
                        f"Full-resolution image of library {library_id!r} not found at {path}. Move it back or "
                        "update uns['spatial'][library_id]['metadata']['source_image_path']."
                    )
                return open_image(str(path)), 1.0, consts.FULLRES
            element = _spatialdata_image(meta, library_id)
            if element is not None:  # a downscaled element (spatialdata-io's Visium hires image) is no full-res one
                kind = consts.HIRES if meta.get(consts.SPATIALDATA_DOWNSCALED) else consts.FULLRES
                return open_image(element, f"SpatialData image {meta.get(consts.SPATIALDATA_IMAGE)!r}"), 1.0, kind
            if consts.FULLRES in images:
                return open_image(images[consts.FULLRES], f"fullres image of {library_id!r}"), 1.0, consts.FULLRES
        elif which in images:
            key = consts.HIRES_SCALEF if which == consts.HIRES else consts.LOWRES_SCALEF
            if key not in sf:
                raise ValueError(
                    f"Library {library_id!r} has a {which!r} image but no {key!r} scale factor to place spots on it."
                )
            if warn and consts.FULLRES in prefer and which != prefer[0]:
                warnings.warn(
                    f"No full-resolution image for library {library_id!r}; using the {which!r} image "
                    f"(scale {float(sf[key]):.3g}), so patches are upsampled and lose detail.",
                    UserWarning,
                    stacklevel=2,
                )
            return open_image(images[which], f"{which} image of {library_id!r}"), float(sf[key]), which
    raise ValueError(
        f"No image for library {library_id!r}: uns['spatial'][{library_id!r}] has images {list(images)} and "
        f"no metadata['source_image_path']. Read the slide with its image (agl.io) or add one."
    )


def coordinate_systems(element) -> list[str]:
    """Names of the coordinate systems a SpatialData element is mapped to."""
    from spatialdata.transformations import get_transformation

    return list((get_transformation(element, get_all=True) or {}).keys())


def _spatialdata_image(meta: dict, library_id: str):
    """The SpatialData image element a library was read from: the live object, else reopened from its zarr store."""
    name = meta.get(consts.SPATIALDATA_IMAGE)
    if not name:
        return None
    element = live_image(meta.get(consts.SPATIALDATA_IMAGE_TOKEN))
    if element is not None:
        return element
    path = meta.get(consts.SPATIALDATA_PATH)
    if not path or not Path(str(path)).exists():
        return None
    import spatialdata as sd

    images = sd.read_zarr(str(path), selection=("images",)).images
    if name not in images:
        raise KeyError(
            f"Library {library_id!r} was read from SpatialData image {name!r} of {path}, which no longer holds it "
            f"(images: {list(images)}). Read the SpatialData again with agl.io.from_spatialdata."
        )
    return images[name]


#: A numeric ``library_key`` column with more distinct values than this is refused (a coordinate, not slides).
MAX_NUMERIC_LIBRARIES = 16


def check_library_column(col: pd.Series, name: str) -> None:
    """Refuse a ``library_key`` column that holds coordinates or measurements rather than slide labels."""
    if isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col.dtype):
        return
    if pd.api.types.is_bool_dtype(col.dtype):
        return
    n_unique = int(col.nunique())
    is_float = pd.api.types.is_float_dtype(col.dtype)
    if is_float or n_unique > MAX_NUMERIC_LIBRARIES:
        raise ValueError(
            f"library_key={name!r} is a {'float' if is_float else 'integer'} column with {n_unique} distinct values "
            f"over {len(col)} spots: it looks like a coordinate or a measurement, not a slide label (each value would "
            f"become a section). Pass the column naming the slides (e.g. 'library_id'), or make this one categorical "
            f"(adata.obs[{name!r}] = adata.obs[{name!r}].astype('category')) if its values really are slides."
        )


def resolve_library_key(adata: AnnData, library_key: str | None = None) -> str | None:
    """The one rule for the ``.obs`` column telling slides apart."""
    if library_key is not None:
        check_library_column(_obs_column(adata, library_key), library_key)
        return library_key
    if consts.LIBRARY_KEY not in adata.obs:
        return None
    n_libs = len(adata.uns.get(consts.SPATIAL_KEY, {}) or {})
    if adata.obs[consts.LIBRARY_KEY].nunique() > 1 or n_libs > 1:
        check_library_column(adata.obs[consts.LIBRARY_KEY], consts.LIBRARY_KEY)
        return consts.LIBRARY_KEY
    return None
