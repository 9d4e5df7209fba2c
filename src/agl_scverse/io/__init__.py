"""Readers: a bare H&E image, legacy ST, 10x Visium, HEST-1k and SpatialData into the AnnData layout of agl-scverse.

Every reader returns one AnnData with raw counts (CSR float32) in ``.X``, spot centres in full-resolution pixels
in ``.obsm["spatial"]``, a categorical ``.obs[library_key]`` and ``.uns["spatial"][library_id]`` with a ``"hires"``
image, scale factors (``tissue_hires_scalef``, ``spot_diameter_fullres``, ``microns_per_pixel``) and metadata
(``source_image_path``, ``patches_h5``); see ``docs/data_layouts.md``.
"""

from ._he_image import read_he_image
from ._hest import read_hest
from ._legacy_st import read_legacy_st
from ._sd_slide import slide_to_spatialdata
from ._spatialdata import from_spatialdata
from ._visium import read_visium

__all__ = ["read_he_image", "read_legacy_st", "read_visium", "read_hest", "from_spatialdata", "slide_to_spatialdata"]
