"""A whole-image overview from the pyramid level nearest a downsample factor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._files import check_regular_file, open_pil
from ._open import open_image
from ._source import LEVEL_TOLERANCE
from ._tiff import is_tiff

__all__ = ["overview"]


def overview(image: Any, downsample: float) -> tuple[np.ndarray, float]:
    """A whole image at about ``1 / downsample`` of its size (nearest finer level, or PIL ``draft``), its downsample."""
    from PIL import Image

    downsample = max(1.0, float(downsample))
    if isinstance(image, str | os.PathLike) and not is_tiff(Path(image)):
        check_regular_file(image)
        with open_pil(image) as im:
            w, h = im.size
            tw, th = max(1, round(w / downsample)), max(1, round(h / downsample))
            im.draft("RGB", (tw, th))
            rgb = im.convert("RGB")
            if rgb.size != (tw, th):
                rgb = rgb.resize((tw, th), Image.Resampling.BOX)
            return np.asarray(rgb, dtype=np.uint8), w / tw
    src = open_image(image)
    w, h = src.width, src.height
    tw, th = max(1, round(w / downsample)), max(1, round(h / downsample))
    level = max(
        (i for i, lv in enumerate(src.levels) if lv.downsample <= downsample * (1 + LEVEL_TOLERANCE)), default=0
    )
    arr = src.read_level(level)
    if arr.shape[:2] != (th, tw):
        arr = np.asarray(Image.fromarray(arr).resize((tw, th), Image.Resampling.BOX), dtype=np.uint8)
    return arr, w / tw
