"""Tiny synthetic H&E images for the whole-slide route: white glass with one pink/purple tissue blob."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 600
CENTRE, RADIUS = (300, 300), 180  # (row, col) and radius of the tissue blob, in pixels


def he_pixels(size: int = SIZE, seed: int = 0) -> np.ndarray:
    """``size x size`` RGB uint8: near-white background, an H&E-pink disk of radius 180 px with purple dots."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 244, dtype=np.uint8)
    rr, cc = disk(CENTRE, RADIUS, shape=(size, size))
    img[rr, cc] = (214, 120, 176)
    for _ in range(60):  # nuclei
        r, c = rng.integers(CENTRE[0] - 120, CENTRE[0] + 120, size=2)
        rr, cc = disk((r, c), 6, shape=(size, size))
        img[rr, cc] = (110, 60, 150)
    noise = rng.integers(-6, 7, size=img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_png(folder: Path, name: str = "he.png", seed: int = 0) -> Path:
    from PIL import Image

    path = Path(folder) / name
    Image.fromarray(he_pixels(seed=seed)).save(path)
    return path


def write_tiff(folder: Path, microns_per_pixel: float = 1.0, name: str = "he.tif") -> Path:
    """A flat TIFF with XResolution / ResolutionUnit (centimetre) tags giving ``microns_per_pixel``."""
    import tifffile

    path = Path(folder) / name
    per_cm = 1e4 / microns_per_pixel
    tifffile.imwrite(path, he_pixels(), photometric="rgb", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return path


def write_ome_pyramid(folder: Path, microns_per_pixel: float = 0.5, name: str = "he.ome.tif") -> Path:
    """A tiled pyramidal OME-TIFF (levels 1, 2, 4 in SubIFDs) with ``PhysicalSizeX``."""
    import tifffile

    path = Path(folder) / name
    img = he_pixels()
    levels = [img, img[::2, ::2], img[::4, ::4]]
    with tifffile.TiffWriter(path, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": microns_per_pixel, "PhysicalSizeY": microns_per_pixel}
        tw.write(levels[0], subifds=2, tile=(128, 128), photometric="rgb", metadata=meta)
        for lv in levels[1:]:
            tw.write(np.ascontiguousarray(lv), subfiletype=1, tile=(128, 128), photometric="rgb")
    return path
