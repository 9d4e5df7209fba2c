"""Tissue detection on a low-resolution overview of an H&E image (scikit-image)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from agl_scverse import _constants as consts
from agl_scverse import _spatial
from agl_scverse._images import overview

__all__ = ["TissueMask", "tissue_mask", "slide_image"]


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask of a slide and its scale.

    Attributes
    ----------
    mask
        Boolean ``(h, w)`` array, True on tissue.
    downsample
        Full-resolution pixels per mask pixel.
    microns_per_pixel
        µm per full-resolution pixel.
    threshold
        The saturation threshold used (0..1).
    """

    mask: np.ndarray
    downsample: float
    microns_per_pixel: float
    threshold: float

    @property
    def fraction(self) -> float:
        """Fraction of the image covered by tissue."""
        return float(self.mask.mean())

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """Whether each full-resolution ``(x, y)`` lies on tissue (False outside the image)."""
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        col, row = np.floor(xy / self.downsample).astype(np.int64).T
        h, w = self.mask.shape
        ok = (col >= 0) & (row >= 0) & (col < w) & (row < h)
        out = np.zeros(len(xy), dtype=bool)
        out[ok] = self.mask[row[ok], col[ok]]
        return out


def slide_image(data: Any, library_id: str | None = None, microns_per_pixel: float | None = None):
    """``(image, µm per full-res pixel, fullres-to-image scale, library id)`` of an AnnData's library or an image."""
    if isinstance(data, AnnData):
        library_id = _spatial.one_library(data, library_id)
        mpp = _spatial.microns_per_pixel(data, library_id) if microns_per_pixel is None else float(microns_per_pixel)
        meta = _spatial.library_entry(data, library_id).get(consts.METADATA) or {}
        path = meta.get(consts.SOURCE_IMAGE_PATH)
        if path is not None and Path(path).is_file():
            return str(path), mpp, 1.0, str(library_id)
        src, scale, _ = _spatial.get_image(data, library_id, warn=False)
        return src, mpp, float(scale), str(library_id)
    if microns_per_pixel is None:
        raise ValueError(
            "The image's scale is unknown: pass microns_per_pixel=<µm per full-resolution pixel>, or read it with "
            "agl.io.read_he_image (which takes it from the file's metadata)."
        )
    mpp = float(microns_per_pixel)
    if not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"microns_per_pixel is {microns_per_pixel!r}; it must be a positive number, e.g. 0.5.")
    lib = library_id or (Path(data).name.split(".")[0] if isinstance(data, str | Path) else "slide")
    return data, mpp, 1.0, str(lib)


def _small_removed(func, old_name: str, mask: np.ndarray, size: int) -> np.ndarray:
    """``func(mask, max_size=size)`` (scikit-image >= 0.26), or its older form."""
    if size <= 0:
        return mask
    try:
        return func(mask, max_size=size)
    except TypeError:
        return func(mask, **{old_name: size + 1})


def tissue_mask(
    data: Any,
    *,
    library_id: str | None = None,
    microns_per_pixel: float | None = None,
    mask_um_per_px: float = 10.0,
    min_saturation: float = 0.05,
    min_object_um2: float = 10_000.0,
    max_hole_um2: float = 10_000.0,
) -> TissueMask:
    """Find the tissue of an H&E slide on a low-resolution overview.

    The image is read at about ``mask_um_per_px``, its HSV saturation thresholded with Otsu's method (never below
    ``min_saturation``), dark pixels (value below 0.15) dropped, small objects removed and small holes filled
    (scikit-image).

    Parameters
    ----------
    data
        An AnnData from :func:`agl_scverse.io.read_he_image` (or any reader), or an image path / RGB array.
    library_id
        The library of an AnnData holding several.
    microns_per_pixel
        µm per full-resolution pixel (required for a path or array; overrides the AnnData's scale factor).
    mask_um_per_px
        Resolution of the mask in µm per pixel.
    min_saturation
        Lowest saturation (0..1) counted as tissue, whatever Otsu's threshold says.
    min_object_um2
        Smallest tissue piece kept, in µm².
    max_hole_um2
        Largest hole inside the tissue filled, in µm².

    Returns
    -------
    A :class:`TissueMask` (``.mask``, ``.downsample``, ``.contains(xy)``).

    Examples
    --------
    >>> import agl_scverse as agl
    >>> slide = agl.io.read_he_image("he.jpg", microns_per_pixel=0.71)  # doctest: +SKIP
    >>> tm = agl.pp.tissue_mask(slide)  # doctest: +SKIP
    >>> tm.mask.shape, round(tm.fraction, 2)  # doctest: +SKIP
    ((704, 659), 0.41)
    """
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    if not (np.isfinite(mask_um_per_px) and mask_um_per_px > 0):
        raise ValueError(f"mask_um_per_px is {mask_um_per_px!r}; it must be a positive number (e.g. 10).")
    image, mpp, scale, lib = slide_image(data, library_id, microns_per_pixel)
    img, ds_img = overview(image, mask_um_per_px / mpp * scale)
    downsample = ds_img / scale
    _, sat, val = np.moveaxis(rgb2hsv(img), -1, 0)
    thr = max(float(threshold_otsu(sat)) if np.ptp(sat) > 1e-6 else 1.0, float(min_saturation))
    mask = (sat > thr) & (val > 0.15)
    px_um2 = (downsample * mpp) ** 2
    mask = _small_removed(remove_small_objects, "min_size", mask, int(min_object_um2 / px_um2))
    mask = _small_removed(remove_small_holes, "area_threshold", mask, int(max_hole_um2 / px_um2))
    if not mask.any():
        raise ValueError(
            f"No tissue found on {lib!r}: no piece of at least {min_object_um2:g} µm² with HSV saturation above "
            f"{thr:.3f}. Check the image is an H&E slide, or lower min_saturation / min_object_um2."
        )
    return TissueMask(mask=mask, downsample=float(downsample), microns_per_pixel=mpp, threshold=thr)
