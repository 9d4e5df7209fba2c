"""The resolution rule of patches: a slide's patches may not be cut from a coarser image than the model's were."""

from __future__ import annotations

import warnings

from agl_scverse import _constants as consts

__all__ = ["check_source_resolution", "effective_um_per_px"]

#: The fix named when a spot slide's patches are too coarse (a slide read with its own spot table).
SPOT_FIX = (
    " Give the slide's full-resolution image (agl.io.read_visium(..., fullres_image=...), the SpatialData "
    "full-res image element) and re-embed, or pass allow_lowres=True to predict anyway."
)


def effective_um_per_px(rec: dict) -> float | None:
    """The coarsest detail of a record's patches: max over libraries of ``max(source µm/px, patch µm/px)``."""
    src = rec.get("source_um_per_px")
    if not src or not rec.get("patch_um") or not rec.get("patch_px"):
        return None
    vals = src.values() if isinstance(src, dict) else [src]
    patch = float(rec["patch_um"]) / float(rec["patch_px"])
    return max(max(float(v), patch) for v in vals)


def check_source_resolution(
    data_rec: dict, model_rec: dict, allow_lowres: bool = False, what: str = "slide", fix: str = SPOT_FIX
) -> None:
    """Refuse patches cut from a coarser image than the model was trained on (unless ``allow_lowres``).

    Each side's resolution is the coarsest over its libraries of ``max(source_um_per_px, patch_um / patch_px)``
    (the detail the patches carry); the data may be up to ``LOWRES_TOLERANCE`` (x1.2) coarser. Skipped when either
    side does not record ``source_um_per_px`` (embeddings made before it was recorded, or brought by the user).
    ``fix`` ends the error message (what to do).

    Examples
    --------
    >>> m = {"patch_px": 224, "patch_um": 112.0, "source_um_per_px": {"A": 0.25}}
    >>> check_source_resolution({**m, "source_um_per_px": {"B": 0.5}}, m)  # patches are 0.5 µm/px anyway
    >>> check_source_resolution({**m, "source_um_per_px": {"B": 3.6}}, m)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The slide's patches were cut from a 3.6 µm/px image ...
    """
    data_mpp, model_mpp = effective_um_per_px(data_rec or {}), effective_um_per_px(model_rec or {})
    if data_mpp is None or model_mpp is None or data_mpp <= model_mpp * consts.LOWRES_TOLERANCE:
        return
    where = ", ".join(
        f"{lib}: {float(v):.3g} µm/px ({(data_rec.get('image') or {}).get(lib, '?')}, level "
        f"{(data_rec.get('level') or {}).get(lib, 0)})"
        for lib, v in (data_rec.get("source_um_per_px") or {}).items()
    )
    msg = (
        f"The {what}'s patches were cut from a {data_mpp:.3g} µm/px image ({where}), coarser than the "
        f"{model_mpp:.3g} µm/px the model was trained on: predictions from upsampled patches are worse."
    )
    if not allow_lowres:
        raise ValueError(msg + fix)
    warnings.warn(msg + " Predicting anyway (allow_lowres=True).", UserWarning, stacklevel=3)
