"""Reader for one HEST-1k sample: ``st/<id>.h5ad`` and its pre-extracted patches ``patches/<id>.h5``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData, read_h5ad
from scanpy import logging as logg
from tqdm.auto import tqdm

from agl_scverse import _constants as consts
from agl_scverse import _spatial, _validate
from agl_scverse._docs import d
from agl_scverse._utils import show_progress

from ._common import (
    check_in_image,
    finalize,
    image_size,
    positive_number,
    spatial_entry,
    thumbnail_from_array,
    thumbnail_from_file,
)

__all__ = ["read_hest"]


@d.dedent
def read_hest(
    st_path: str | Path,
    patches_path: str | Path | None = None,
    library_id: str | None = None,
    microns_per_pixel: float | None = None,
    patch_microns: float = consts.DEFAULT_PATCH_UM,
    library_key: str = consts.LIBRARY_KEY,
    fullres_image: str | Path | None = None,
    patch_coords: Literal["topleft", "center"] = "topleft",
    spot_diameter_um: float = _spatial.VISIUM_SCALEFACTOR_SPOT_UM,
    hires_max_px: int = 2000,
    progress: bool | None = None,
) -> AnnData:
    """Read one HEST-1k sample into the agl-scverse layout, keeping its patches on disk.

    The counts come from ``st/<id>.h5ad``; the patches file ``patches/<id>.h5`` (``img``, ``coords``, ``barcode``)
    is matched to the spots on the barcode and read lazily later by :class:`agl_scverse.pp.SpotPatches`.

    Parameters
    ----------
    st_path
        The sample's ``.h5ad`` file (raw counts in ``.X``).
    patches_path
        The sample's patches ``.h5``; default ``<st_path>/../../patches/<id>.h5`` when it exists.
    library_id
        Library id; default the file stem (the HEST sample id).
    microns_per_pixel
        µm per full-resolution pixel (HEST's ``pixel_size_um_estimated``). Default: the h5ad's scale factor or
        ``pixel_size_um_*`` entry, else ``patch_microns`` over the h5's ``patch_size``, else
        ``spot_diameter_um / spot_diameter_fullres`` with a warning.
    patch_microns
        Physical side of one HEST patch (224 px at 0.5 µm/px = 112 µm).
    library_key
        ``.obs`` column naming the library (categorical).
    fullres_image
        The whole-slide image (``wsis/<id>.tif``), recorded as ``metadata["source_image_path"]``.
    patch_coords
        Whether the h5 ``coords`` are the patches' top-left corners (as HEST writes them) or centres; used only
        when the h5ad has no ``obsm["spatial"]``.
    spot_diameter_um
        Spot diameter in µm when the h5ad records no ``spot_diameter_fullres`` (Space Ranger's 65 µm for Visium).
    hires_max_px
        Longest side of the ``"hires"`` thumbnail (the h5ad's image, else the whole-slide image, else a patch
        mosaic).
    %(progress)s

    Returns
    -------
    AnnData in the agl-scverse layout (:doc:`/data_layouts`), with ``.obs["hest_patch_index"]`` and
    ``metadata["patches_h5"]`` when a patches file is used.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.io.read_hest("hest_data/st/TENX95.h5ad", "hest_data/patches/TENX95.h5")  # doctest: +SKIP
    >>> adata.obs["hest_patch_index"].head()  # doctest: +SKIP
    """
    st_path = Path(st_path)
    if not st_path.is_file():
        raise FileNotFoundError(f"{st_path} does not exist; pass the HEST sample's st/<id>.h5ad file.")
    if patch_coords not in ("topleft", "center"):
        raise ValueError(f"patch_coords must be 'topleft' or 'center', got {patch_coords!r}.")
    patch_microns = positive_number(patch_microns, "patch_microns", "HEST patches cover 112 µm.")
    if microns_per_pixel is not None:
        microns_per_pixel = positive_number(microns_per_pixel, "microns_per_pixel", "Pass µm per pixel.")
    library_id = str(library_id) if library_id is not None else st_path.stem
    patches_path = _patches_file(st_path, patches_path)
    if fullres_image is not None:
        fullres_image = Path(fullres_image).resolve()
        width, height = image_size(fullres_image)

    adata = read_h5ad(st_path)
    _validate.check_not_empty(adata)
    _validate.check_unique_names(adata)
    _validate.check_counts(adata.X, what=f"X of {st_path}")
    old_entry, old_lib = _h5ad_library(adata)
    old_sf = dict((old_entry or {}).get(consts.SCALEFACTORS, {}) or {})

    h5 = _read_h5_index(patches_path) if patches_path is not None else None

    mpp, mpp_source = microns_per_pixel, "given"
    if mpp is None:
        mpp, mpp_source = _guess_mpp(adata, old_sf, h5, patch_microns, spot_diameter_um, library_id)

    # spots <-> patches
    keep = np.ones(adata.n_obs, dtype=bool)
    rows = None
    if h5 is not None and patches_path is not None:
        rows_all = pd.Index(h5["barcode"]).get_indexer(adata.obs_names.astype(str))  # barcodes are unique
        keep = rows_all >= 0
        n_no_patch, n_no_spot = int((~keep).sum()), int(len(h5["barcode"]) - keep.sum())
        if n_no_patch or n_no_spot:
            logg.warning(
                f"HEST sample {library_id!r}: {n_no_patch} spot(s) have no patch and {n_no_spot} patch(es) have no "
                f"spot in {st_path.name}; keeping the {int(keep.sum())} matched spots."
            )
        if not keep.any():
            raise ValueError(
                f"The slide {library_id!r} is empty: no barcode of {patches_path.name} "
                f"(e.g. {list(h5['barcode'][:3])}) matches the spots of {st_path.name} "
                f"(e.g. {adata.obs_names[:3].tolist()}). Pass the patches file of this sample."
            )
        rows = rows_all[keep].astype(np.int64)

    # coordinates in full-resolution pixels
    if consts.SPATIAL_KEY in adata.obsm:
        xy = np.asarray(adata.obsm[consts.SPATIAL_KEY], dtype=float)[keep, :2]
        xy_source = "h5ad obsm['spatial']"
    elif h5 is not None:
        xy = h5["coords"][rows].astype(float)
        if patch_coords == "topleft":
            xy = xy + patch_microns / mpp / 2.0
        xy_source = f"patches h5 coords ({patch_coords})"
    else:
        raise KeyError(
            f"{st_path} has no obsm['spatial'] and no patches file was given: the spot positions are unknown. "
            "Pass patches_path=<patches/<id>.h5>."
        )
    if not np.all(np.isfinite(xy)):
        raise ValueError(f"The spot coordinates of {st_path.name} hold NaN/inf; fix obsm['spatial'].")

    # image: the h5ad's own, the whole-slide image, or a mosaic of the patches
    if fullres_image is not None:
        check_in_image(xy, width, height, library_id, image=str(fullres_image))
    img, s_img = _h5ad_image(old_entry, old_sf)
    if img is not None:
        hires, scalef = thumbnail_from_array(img, hires_max_px, name=f"the image of {st_path.name}")
        scalef *= s_img
        image_source = f"h5ad uns['spatial'][{old_lib!r}]"
    elif fullres_image is not None:
        hires, scalef = thumbnail_from_file(fullres_image, hires_max_px)
        image_source = str(fullres_image)
    elif patches_path is not None and rows is not None:
        bar = show_progress(progress)
        hires, scalef = _patch_mosaic(patches_path, rows, xy, patch_microns / mpp, hires_max_px, progress=bar)
        image_source = "mosaic of the HEST patches"
    else:
        raise FileNotFoundError(
            f"No image for library {library_id!r}: {st_path.name} holds no image, and neither patches_path nor "
            "fullres_image was given. Pass the sample's patches/<id>.h5 or its whole-slide image."
        )

    spot_diam = old_sf.get(consts.SPOT_DIAMETER)
    if spot_diam is None:
        spot_diam = spot_diameter_um / mpp
    spot_diam = positive_number(spot_diam, f"spot_diameter_fullres of {st_path.name}", "Fix the h5ad's scale factors.")

    out = adata[keep].copy() if not keep.all() else adata
    out.obsm[consts.SPATIAL_KEY] = xy
    out.obs[library_key] = library_id
    if rows is not None:
        out.obs[consts.HEST_PATCH_INDEX] = rows
    out.uns[consts.SPATIAL_KEY] = {
        library_id: spatial_entry(
            hires,
            scalef,
            spot_diameter_fullres=spot_diam,
            microns_per_pixel=mpp,
            source_image_path=fullres_image,
            patches_h5=str(patches_path) if patches_path is not None else None,
            microns_per_pixel_source=mpp_source,
            coordinates_source=xy_source,
            hires_source=image_source,
            patch_microns=patch_microns,
            reader="read_hest",
        )
    }
    finalize(out, library_key)
    logg.info(f"read HEST sample {library_id!r}: {out.n_obs} spots x {out.n_vars} genes, {mpp:.4f} µm/px")
    return out


def _patches_file(st_path: Path, patches_path: str | Path | None) -> Path | None:
    """The given patches file (checked), else ``../patches/<id>.h5`` beside ``st/`` if present."""
    if patches_path is None:
        guess = st_path.resolve().parent.parent / "patches" / f"{st_path.stem}.h5"
        return guess if guess.is_file() else None
    patches_path = Path(patches_path).resolve()
    if not patches_path.is_file():
        raise FileNotFoundError(f"{patches_path} does not exist; pass the sample's patches/<id>.h5 or None.")
    return patches_path


def _read_h5_index(path: Path) -> dict:
    """Barcodes and coordinates of a HEST patches file, checking its layout (the patches stay on disk)."""
    import h5py

    with h5py.File(path, "r") as f:
        missing = [k for k in ("img", "coords", "barcode") if k not in f]
        if missing:
            raise KeyError(
                f"HEST patches file {path} lacks datasets {missing} (has {list(f)}); expected 'img' (n, side, side, 3) "
                "uint8, 'coords' (n, 2) and 'barcode' (n,)."
            )
        img = f["img"]
        if img.ndim != 4 or img.shape[3] != 3:
            raise ValueError(f"HEST patches in {path} have shape {img.shape}; expected (n, side, side, 3) RGB.")
        if img.dtype != np.uint8:
            raise ValueError(f"HEST patches in {path} have dtype {img.dtype}; expected uint8.")
        coords = np.asarray(f["coords"][()], dtype=float)
        barcodes = np.asarray(f["barcode"][()]).reshape(len(f["barcode"]), -1)[:, 0]
        attrs = dict(img.attrs)
        n = img.shape[0]
    barcodes = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in barcodes])
    if coords.shape != (n, 2) or len(barcodes) != n:
        raise ValueError(
            f"HEST patches file {path}: img has {n} patches but coords {coords.shape} and barcode ({len(barcodes)},); "
            "they must have one row per patch."
        )
    if not pd.Index(barcodes).is_unique:
        dup = pd.Index(barcodes)[pd.Index(barcodes).duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicate spot barcodes {dup} in {path}; each barcode must have one patch.")
    return {"barcode": barcodes, "coords": coords, "attrs": attrs, "n": n}


def _h5ad_library(adata: AnnData) -> tuple[dict | None, str | None]:
    spatial = adata.uns.get(consts.SPATIAL_KEY)
    if not isinstance(spatial, dict) or not spatial:
        return None, None
    for lib, entry in spatial.items():
        if isinstance(entry, dict) and entry.get(consts.IMAGES):
            return entry, lib
    lib = next(iter(spatial))
    return (spatial[lib] if isinstance(spatial[lib], dict) else None), lib


def _h5ad_image(entry: dict | None, sf: dict) -> tuple[np.ndarray | None, float]:
    """The h5ad's own image with its scale factor (hires first, then HEST's downscaled_fullres, then lowres)."""
    images = (entry or {}).get(consts.IMAGES, {}) or {}
    for name, key in (
        (consts.HIRES, consts.HIRES_SCALEF),
        ("downscaled_fullres", "tissue_downscaled_fullres_scalef"),
        (consts.LOWRES, consts.LOWRES_SCALEF),
    ):
        if name in images and key in sf:
            s = positive_number(sf[key], f"Scale factor {key!r} of the h5ad", "Fix the h5ad's scale factors.")
            return np.asarray(images[name]), s
    return None, 1.0


def _guess_mpp(adata, sf: dict, h5, patch_microns: float, spot_diameter_um: float, lib: str) -> tuple[float, str]:
    fix = "Pass microns_per_pixel (HEST metadata: pixel_size_um_estimated)."
    if consts.MICRONS_PER_PIXEL in sf:
        return positive_number(sf[consts.MICRONS_PER_PIXEL], "microns_per_pixel of the h5ad", fix), "h5ad scale factors"
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded", "pixel_size_um"):
        if key in adata.uns:
            return positive_number(adata.uns[key], f"uns[{key!r}] of the h5ad", fix), f"h5ad uns[{key!r}]"
    if h5 is not None and "patch_size" in h5["attrs"]:
        src = positive_number(h5["attrs"]["patch_size"], "the 'patch_size' attribute of the patches h5", fix)
        return patch_microns / src, f"{patch_microns:g} µm / source patch size {src:g} px (h5 attribute)"
    if consts.SPOT_DIAMETER in sf:
        d = positive_number(sf[consts.SPOT_DIAMETER], "spot_diameter_fullres of the h5ad", fix)
        warnings.warn(
            f"HEST sample {lib!r} records no pixel size; assuming {spot_diameter_um:g} µm spots "
            f"(spot_diameter_fullres={d:g}). {fix}",
            UserWarning,
            stacklevel=3,
        )
        return spot_diameter_um / d, f"{spot_diameter_um:g} µm / spot_diameter_fullres (assumed)"
    raise ValueError(f"The physical scale of HEST sample {lib!r} is unknown: no pixel size in the h5ad or h5. {fix}")


def _patch_mosaic(
    path: Path,
    rows: np.ndarray,
    xy: np.ndarray,
    footprint_px: float,
    max_px: int,
    chunk: int = 256,
    progress: bool = True,
) -> tuple[np.ndarray, float]:
    """A thumbnail of the slide pasted together from the patches, read in chunks (never all in memory)."""
    import h5py
    from PIL import Image

    half = footprint_px / 2.0
    extent = float(max(xy[:, 0].max(), xy[:, 1].max()) + half)
    scale = min(1.0, max_px / extent)
    w = int(np.ceil((xy[:, 0].max() + half) * scale))
    h = int(np.ceil((xy[:, 1].max() + half) * scale))
    side = max(1, round(footprint_px * scale))
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    order = np.argsort(rows)
    with h5py.File(path, "r") as f:
        img = f["img"]
        for start in tqdm(
            range(0, len(order), chunk), desc="HEST patch mosaic", disable=len(order) <= 4 * chunk or not progress
        ):
            sel = order[start : start + chunk]
            block = img[np.asarray(rows[sel])]  # h5py: increasing indices
            for k, i in enumerate(sel):  # paste clips tiles at the canvas border
                tile = Image.fromarray(block[k]).resize((side, side), Image.Resampling.BILINEAR)
                canvas.paste(tile, (round((xy[i, 0] - half) * scale), round((xy[i, 1] - half) * scale)))
    return np.asarray(canvas, dtype=np.uint8), scale
