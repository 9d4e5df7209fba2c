"""Helpers shared by the readers: image headers and thumbnails, scale estimates, the final layout checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from agl_scverse import _constants as consts
from agl_scverse import _spatial, _validate
from agl_scverse._images import check_regular_file, open_pil


def _open_image(path: str | Path):
    """Open an image file lazily (header only) with the pixel limit lifted for whole-slide images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No image for this slide: {path} does not exist. Pass the path of the full-resolution H&E image "
            "or put it where the reader expects it."
        )
    check_regular_file(path)
    im = open_pil(path)
    if im.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1"):  # grayscale
        im.close()
        raise ValueError(
            f"Image {path} is grayscale (PIL mode {im.mode!r}); an RGB H&E image is required. "
            "Pass the colour image of the slide."
        )
    return im


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header without decoding the pixels."""
    with _open_image(path) as im:
        return int(im.size[0]), int(im.size[1])


def _target_size(w: int, h: int, max_px: int) -> tuple[int, int, float]:
    if max_px <= 0:
        raise ValueError(f"hires_max_px must be positive, got {max_px}.")
    scale = min(1.0, max_px / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale)), scale


def thumbnail_from_file(path: str | Path, max_px: int = 2000) -> tuple[np.ndarray, float]:
    """Downscaled RGB uint8 copy of an image file (longest side ``<= max_px``) and its scale factor."""
    from PIL import Image

    with _open_image(path) as im:
        w, h = im.size
        tw, th, scale = _target_size(w, h, max_px)
        if scale < 1.0:
            im.draft("RGB", (tw, th))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below the target
        rgb = im.convert("RGB")
        if rgb.size != (tw, th):
            rgb = rgb.resize((tw, th), Image.Resampling.LANCZOS)
        arr = np.asarray(rgb, dtype=np.uint8)
    return arr, float(tw / w) if scale < 1.0 else 1.0


def thumbnail_from_array(img: np.ndarray, max_px: int = 2000, name: str = "image") -> tuple[np.ndarray, float]:
    """Downscaled RGB uint8 copy of an in-memory image (longest side ``<= max_px``) and its scale factor."""
    from PIL import Image

    img = _spatial.as_rgb(img, name=name)
    h, w = img.shape[:2]
    tw, th, scale = _target_size(w, h, max_px)
    if scale >= 1.0:
        return np.ascontiguousarray(img), 1.0
    out = np.asarray(Image.fromarray(img).resize((tw, th), Image.Resampling.LANCZOS), dtype=np.uint8)
    return out, float(tw / w)


def nearest_neighbour_px(xy: np.ndarray) -> float:
    """Median distance (pixels) from each spot to its nearest neighbour."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=float)
    if len(xy) < 2:
        raise ValueError(
            "Cannot estimate microns_per_pixel from the spot grid with fewer than 2 spots; pass microns_per_pixel."
        )
    nn = cKDTree(xy).query(xy, k=2)[0][:, 1]
    nn = nn[nn > 0]
    if nn.size == 0:
        raise ValueError("All spots share one position; cannot estimate microns_per_pixel. Pass microns_per_pixel.")
    return float(np.median(nn))


def positive_number(value, name: str, fix: str) -> float:
    """``float(value)`` if it is a finite positive number, else a clear ValueError."""
    try:
        val = float(value)
        ok = bool(np.isfinite(val) and val > 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} is {value!r}; it must be a positive number. {fix}")
    return val


def check_in_image(xy: np.ndarray, width: int, height: int, library_id: str, image: str = "the image") -> None:
    """Every spot centre must lie inside the full-resolution image."""
    xy = np.asarray(xy, dtype=float)
    out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if out.any():
        ex = xy[out][:3].round(1).tolist()
        raise ValueError(
            f"{int(out.sum())} of {len(xy)} spots of library {library_id!r} lie outside {image} "
            f"({width} x {height} px), e.g. (x, y) = {ex}. The spot coordinates do not belong to this image or use "
            "another resolution: pass the matching full-resolution image or rescale the coordinates."
        )


def as_csr_float32(X) -> sp.csr_matrix:
    """Counts as scipy CSR float32."""
    return sp.csr_matrix(X if sp.issparse(X) else np.asarray(X, dtype=np.float32), dtype=np.float32)


def finalize(adata: AnnData, library_key: str, he_only: bool = False) -> AnnData:
    """Last checks of a reader's output (``he_only``: spots x 0 genes); counts become CSR float32."""
    if he_only:
        if adata.n_obs == 0:
            raise ValueError("The slide has no spots; check its spot table.")
        _validate.check_unique_names(adata)
    else:
        _validate.check_adata(adata)
    adata.X = as_csr_float32(adata.X)
    xy = _validate.check_spatial(adata)
    adata.obsm[consts.SPATIAL_KEY] = np.ascontiguousarray(xy, dtype=np.float64)
    libs = adata.obs[library_key].astype(str)
    adata.obs[library_key] = pd.Categorical(libs, categories=list(dict.fromkeys(libs)))
    for lib in adata.obs[library_key].cat.categories:
        entry = _spatial.library_entry(adata, lib)
        sf = _spatial.scalefactors(adata, lib)  # raises on non-positive values
        required = [consts.SPOT_DIAMETER, consts.MICRONS_PER_PIXEL]
        required += [consts.HIRES_SCALEF] if consts.HIRES in (entry.get(consts.IMAGES) or {}) else []
        missing = [key for key in required if key not in sf]
        if missing:
            raise ValueError(
                f"Scale factors {missing} of library {lib!r} are missing. Add them to "
                "uns['spatial'][library_id]['scalefactors'] or pass them to the reader."
            )
    return adata


def spatial_entry(
    hires: np.ndarray | None,
    hires_scalef: float | None,
    spot_diameter_fullres: float,
    microns_per_pixel: float,
    source_image_path: str | Path | None = None,
    **metadata,
) -> dict:
    """One ``uns['spatial'][library_id]`` entry in the layout of :mod:`agl_scverse._constants`."""
    images = {}
    sf = {consts.SPOT_DIAMETER: float(spot_diameter_fullres), consts.MICRONS_PER_PIXEL: float(microns_per_pixel)}
    if hires is not None:
        if hires_scalef is None:
            raise ValueError("A hires image needs its hires_scalef (hires pixels per full-resolution pixel).")
        images[consts.HIRES] = hires
        sf[consts.HIRES_SCALEF] = float(hires_scalef)
    meta = {k: v for k, v in metadata.items() if v is not None}
    if source_image_path is not None:
        meta[consts.SOURCE_IMAGE_PATH] = str(Path(source_image_path).resolve())
    return {consts.IMAGES: images, consts.SCALEFACTORS: sf, consts.METADATA: meta}
