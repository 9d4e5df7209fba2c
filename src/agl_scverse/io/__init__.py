"""Readers: a bare H&E image, legacy ST, 10x Visium, HEST-1k and SpatialData into one layout (docs/data_layouts.md)."""

from ._he_image import read_he_image
from ._hest import read_hest
from ._legacy_st import read_legacy_st
from ._sd_slide import slide_to_spatialdata
from ._spatialdata import from_spatialdata
from ._visium import read_visium

__all__ = ["read_he_image", "read_legacy_st", "read_visium", "read_hest", "from_spatialdata", "slide_to_spatialdata"]
