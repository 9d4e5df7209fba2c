"""Pseudo-spots over the tissue of a bare H&E slide: a hexagonal (Visium-like) or square grid."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse import _spatial
from agl_scverse._resolution import check_source_resolution
from agl_scverse._spatial import one_library
from agl_scverse.io import read_he_image
from agl_scverse.io._common import finalize, positive_number

from ._tissue import TissueMask, tissue_mask

__all__ = ["spot_grid", "VISIUM_SPOT_UM", "VISIUM_PITCH_UM", "MIN_INSIDE", "model_patch_um"]

#: Visium's spot diameter and centre-to-centre distance (µm): the grid's defaults without a model.
VISIUM_SPOT_UM = 55.0
VISIUM_PITCH_UM = 100.0
#: Grid points whose patch lies less than this fraction inside the image are dropped (SpotPatches' min_inside).
MIN_INSIDE = 0.5
GRID_UNS = "agl_grid"


def _encoder_record(model: Any) -> dict:
    from agl_scverse.model import AGLModel

    return dict(AGLModel.coerce(model).config.get("encoder") or {})


def model_patch_um(model: Any) -> float | None:
    """The patch side (µm) a saved or fitted model was trained on, or None when its record has none."""
    um = _encoder_record(model).get("patch_um")
    return float(um) if um else None


def _check_resolution(enc: dict, data: AnnData, lib: str, mpp: float, allow_lowres: bool) -> None:
    _, scale, which = _spatial.get_image(data, lib, warn=False)
    rec = {"source_um_per_px": {lib: mpp / scale}, "image": {lib: which}, "level": {lib: 0}}
    rec.update(patch_um=enc.get("patch_um"), patch_px=enc.get("patch_px"))
    fix = (
        f" If {mpp:g} µm per full-resolution pixel is wrong, pass the right scale (microns_per_pixel=, CLI: "
        "--microns-per-pixel); else predict a finer scan, or pass allow_lowres=True to spot_grid and predict_anndata "
        "(CLI: --allow-lowres) to predict anyway."
    )
    check_source_resolution(rec, enc, allow_lowres, what=f"slide {lib!r}", fix=fix)


def _inside_fraction(xy: np.ndarray, side: float, width: float, height: float, margin: float) -> np.ndarray:
    """Fraction of each ``side``-px square patch centred on ``xy`` inside the image shrunk by ``margin`` px a side."""
    limits = np.array([width, height]) - margin
    inside = np.clip(np.minimum(xy + side / 2, limits) - np.maximum(xy - side / 2, margin), 0.0, None)
    return np.prod(inside, axis=1) / side**2


def spot_grid(
    data: AnnData | str | Path,
    *,
    spot_um: float | None = None,
    pitch_um: float | None = None,
    layout: Literal["hex", "square"] = "hex",
    model: Any = None,
    library_id: str | None = None,
    microns_per_pixel: float | None = None,
    mask: TissueMask | None = None,
    allow_lowres: bool = False,
    **mask_kwargs: Any,
) -> AnnData:
    """Lay pseudo-spots over the tissue of a bare H&E slide, ready for :func:`agl_scverse.tl.predict_anndata`.

    Centres lie on a hexagonal (Visium-like) or square lattice; those on the tissue mask (:func:`tissue_mask`) are
    kept, except those whose patch lies less than half inside the image (:data:`MIN_INSIDE`; logged). With
    ``model``, a slide coarser than the model's training patches is refused before any work.

    Parameters
    ----------
    data
        An AnnData from :func:`agl_scverse.io.read_he_image` (or any reader), or an image file path.
    spot_um
        Spot diameter in µm. Default: the model's training patch side, else 55 (Visium).
    pitch_um
        Centre-to-centre distance of neighbouring spots in µm. Default: the model's training patch side, else 100.
    layout
        ``"hex"`` or ``"square"``.
    model
        A fitted :class:`~agl_scverse.model.AGLModel` or its directory, for the defaults above.
    library_id
        The library of an AnnData holding several.
    microns_per_pixel
        µm per full-resolution pixel of an image path (or to override the AnnData's).
    mask
        A precomputed :class:`TissueMask`; default: ``tissue_mask(data, **mask_kwargs)``.
    allow_lowres
        With ``model``: accept, with a warning, a slide coarser than the model's training patches (pass it to
        :func:`~agl_scverse.tl.predict_anndata` too).
    **mask_kwargs
        Passed to :func:`tissue_mask`.

    Returns
    -------
    A new AnnData of spots x 0 genes: ``.obsm["spatial"]`` (full-resolution pixels), ``.obs["library_id"]``,
    ``.obs["array_row"]`` / ``["array_col"]``, the slide's ``.uns["spatial"]`` and ``.uns["agl_grid"]``.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> slide = agl.io.read_he_image("he.jpg", microns_per_pixel=0.71)  # doctest: +SKIP
    >>> grid = agl.pp.spot_grid(slide, layout="hex", spot_um=55, pitch_um=100)  # doctest: +SKIP
    >>> pred = agl.tl.predict_anndata(grid, "my_model")  # doctest: +SKIP
    """
    if layout not in ("hex", "square"):
        raise ValueError(f"layout is {layout!r}; pass 'hex' (Visium-like) or 'square'.")
    enc = _encoder_record(model) if model is not None else {}
    patch_um = float(enc["patch_um"]) if enc.get("patch_um") else None
    if model is not None and patch_um is None:
        logg.warning("the model records no training patch size; using Visium's spot size and pitch.")
    spot_um = positive_number(
        spot_um if spot_um is not None else (patch_um or VISIUM_SPOT_UM), "spot_um", "Pass a spot diameter in µm."
    )
    pitch_um = positive_number(
        pitch_um if pitch_um is not None else (patch_um or VISIUM_PITCH_UM), "pitch_um", "Pass a spot pitch in µm."
    )
    if not isinstance(data, AnnData):
        data = read_he_image(data, microns_per_pixel=microns_per_pixel, library_id=library_id)
        library_id = next(iter(data.uns[consts.SPATIAL_KEY]))
    library_id = one_library(data, library_id)
    entry = copy.deepcopy(data.uns[consts.SPATIAL_KEY][library_id])
    sf, meta = entry.setdefault(consts.SCALEFACTORS, {}), entry.get(consts.METADATA) or {}
    mpp = float(microns_per_pixel) if microns_per_pixel is not None else sf.get(consts.MICRONS_PER_PIXEL)
    if mpp is None:
        raise ValueError(
            f"Library {library_id!r} records no microns_per_pixel; pass microns_per_pixel=<µm per full-res pixel>."
        )
    pitch_px = pitch_um / mpp
    if pitch_px < 1.0:
        raise ValueError(
            f"pitch_um={pitch_um:g} is {pitch_px:.3g} px at {mpp:g} µm/px: smaller than a pixel. Pass a larger "
            "pitch_um, or check microns_per_pixel."
        )
    if enc:
        _check_resolution(enc, data, library_id, mpp, allow_lowres)
    width, height = meta.get("image_width"), meta.get("image_height")
    if width is None or height is None:
        src, scale, _ = _spatial.get_image(data, library_id, warn=False)
        width, height = src.width / scale, src.height / scale
    if mask is None:
        mask = tissue_mask(data, library_id=library_id, microns_per_pixel=mpp, **mask_kwargs)

    xy, rows, cols = _lattice(float(width), float(height), pitch_px, layout)
    keep = mask.contains(xy)
    if not keep.any():
        raise ValueError(
            f"No grid point of pitch {pitch_um:g} µm falls on the tissue of {library_id!r} (tissue covers "
            f"{mask.fraction:.1%} of the image); pass a smaller pitch_um."
        )
    side_um = patch_um or spot_um
    patch_px = float(enc.get("patch_px") or 0) or None
    margin = max(1.0, 2 * side_um / patch_px / mpp) if patch_px else 1.0  # two patch pixels: the crop's rounding
    edge = keep & (_inside_fraction(xy, side_um / mpp, float(width), float(height), margin) < MIN_INSIDE)
    if edge[keep].all():
        raise ValueError(
            f"Every grid point on the tissue of {library_id!r} has less than {MIN_INSIDE:.0%} of its {side_um:g} µm "
            "patch inside the image; the image is smaller than a patch. Check microns_per_pixel."
        )
    if edge.any():
        logg.warning(
            f"spot_grid: dropped {int(edge.sum())} tissue spots at the image's edge (less than {MIN_INSIDE:.0%} of "
            f"their {side_um:g} µm patch inside the image)."
        )
        keep &= ~edge
    xy, rows, cols = xy[keep], rows[keep], cols[keep]
    lib = str(library_id)
    obs: dict[str, Any] = {consts.LIBRARY_KEY: pd.Categorical([lib] * len(xy), categories=[lib])}
    obs.update(in_tissue=np.ones(len(xy), dtype=np.int64), array_row=rows, array_col=cols)
    index = pd.Index([f"{lib}_{r}x{c}" for r, c in zip(rows, cols)])
    grid = AnnData(X=np.zeros((len(xy), 0), dtype=np.float32), obs=pd.DataFrame(obs, index=index))
    grid.obsm[consts.SPATIAL_KEY] = xy
    sf[consts.SPOT_DIAMETER] = spot_um / mpp
    sf[consts.MICRONS_PER_PIXEL] = mpp
    grid.uns[consts.SPATIAL_KEY] = {lib: entry}
    rec = {"layout": layout, "spot_um": spot_um, "pitch_um": pitch_um, "tissue_threshold": mask.threshold}
    grid.uns[GRID_UNS] = {**rec, "tissue_fraction": mask.fraction, "mask_downsample": mask.downsample}
    finalize(grid, consts.LIBRARY_KEY, he_only=True)
    logg.info(
        f"spot_grid: {grid.n_obs} {layout} spots ({spot_um:g} µm, pitch {pitch_um:g} µm) on {mask.fraction:.1%} "
        f"tissue of {lib!r}"
    )
    return grid


def _lattice(width: float, height: float, pitch: float, layout: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lattice centres ``(n, 2)`` in pixels inside ``width x height``, with their row and column indices."""
    dy = pitch * np.sqrt(3) / 2 if layout == "hex" else pitch
    ys = pitch / 2 + dy * np.arange(max(0, int(np.floor((height - pitch / 2) / dy)) + 1))
    xs = pitch / 2 + pitch * np.arange(max(0, int(np.floor((width - pitch / 2) / pitch)) + 1))
    rows, cols = (g.ravel() for g in np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij"))
    xy = np.column_stack([xs[cols] + (pitch / 2 if layout == "hex" else 0.0) * (rows % 2), ys[rows]]).astype(np.float64)
    inside = (xy[:, 0] < width) & (xy[:, 1] < height)
    return xy[inside], rows[inside].astype(np.int64), cols[inside].astype(np.int64)
