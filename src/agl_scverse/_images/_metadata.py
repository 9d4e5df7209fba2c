"""µm per pixel from a file's own metadata (OME-XML, SVS description, TIFF resolution tags)."""

from __future__ import annotations

from pathlib import Path

from ._files import check_regular_file
from ._tiff import is_tiff

__all__ = ["PLAUSIBLE_UM_PER_PX", "file_microns_per_pixel"]


#: µm per pixel outside this range in a file's resolution tags is taken as a placeholder (e.g. 72 dpi), not a scale.
PLAUSIBLE_UM_PER_PX = (0.01, 50.0)
_UNIT_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def file_microns_per_pixel(path: str | Path) -> tuple[float, str] | None:
    """µm per level-0 pixel a TIFF records (OME, SVS, ``XResolution``; if plausible) and where from, or None."""
    import tifffile
    from tifffile.tifffile import svs_description_metadata

    path = Path(path)
    check_regular_file(path)
    if not is_tiff(path):
        return None
    found: list[tuple[float, str]] = []
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            if tf.is_ome and tf.ome_metadata:
                found += _ome_physical_size(tf.ome_metadata)
            if tf.is_svs:
                mpp = svs_description_metadata(page.description).get("MPP")
                if mpp is not None:
                    found.append((float(mpp), "SVS MPP"))
            tags = page.tags
            res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            if res is not None and unit is not None and int(unit.value) in (2, 3):
                num, den = res.value
                if num > 0 and den > 0:
                    per_unit = num / den  # pixels per inch (2) or per centimetre (3)
                    found.append(((25400.0 if int(unit.value) == 2 else 1e4) / per_unit, "TIFF XResolution"))
    except (tifffile.TiffFileError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable TIFF ({e}).") from e
    lo, hi = PLAUSIBLE_UM_PER_PX
    for value, source in found:
        if lo <= value <= hi:
            return float(value), source
    return None


def _ome_physical_size(xml: str) -> list[tuple[float, str]]:
    """``PhysicalSizeX`` of the first OME ``Pixels`` element in µm (empty when absent or in an unknown unit)."""
    import re

    m = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if m is None:
        return []
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0)))
    if "PhysicalSizeX" not in attrs:
        return []
    unit = _UNIT_UM.get(attrs.get("PhysicalSizeXUnit", "µm"))
    return [] if unit is None else [(float(attrs["PhysicalSizeX"]) * unit, "OME PhysicalSizeX")]
