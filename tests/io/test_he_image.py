"""agl.io.read_he_image: a bare H&E image (PNG, TIFF, pyramidal OME-TIFF) as a slide with no spots."""

from __future__ import annotations

import numpy as np
import pytest
from he_images import SIZE, write_ome_pyramid, write_png, write_tiff

import agl_scverse as agl
from agl_scverse._images import file_microns_per_pixel


def test_tiff_scale_comes_from_its_resolution_tags(tmp_path):
    a = agl.io.read_he_image(write_tiff(tmp_path, microns_per_pixel=0.5))
    entry = a.uns["spatial"]["he"]
    sf, meta = entry["scalefactors"], entry["metadata"]
    assert a.n_obs == 0 and a.obsm["spatial"].shape == (0, 2)
    assert sf["microns_per_pixel"] == pytest.approx(0.5)
    assert sf["spot_diameter_fullres"] == pytest.approx(55 / 0.5)
    assert meta["microns_per_pixel_source"] == "TIFF XResolution"
    assert (meta["image_width"], meta["image_height"]) == (SIZE, SIZE)
    assert meta["source_image_path"].endswith("he.tif")
    assert entry["images"]["hires"].shape == (SIZE, SIZE, 3)  # under hires_max_px: kept whole


def test_ome_pyramid_scale_and_a_thumbnail_from_a_level(tmp_path):
    path = write_ome_pyramid(tmp_path, microns_per_pixel=0.25)
    assert file_microns_per_pixel(path) == (pytest.approx(0.25), "OME PhysicalSizeX")
    a = agl.io.read_he_image(path, library_id="S1", hires_max_px=150)
    sf = a.uns["spatial"]["S1"]["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(0.25)
    assert a.uns["spatial"]["S1"]["images"]["hires"].shape == (150, 150, 3)
    assert sf["tissue_hires_scalef"] == pytest.approx(0.25)


def test_png_needs_microns_per_pixel(tmp_path):
    path = write_png(tmp_path)
    with pytest.raises(ValueError, match="microns_per_pixel="):
        agl.io.read_he_image(path)
    a = agl.io.read_he_image(path, microns_per_pixel=2.0, hires_max_px=300)
    sf = a.uns["spatial"]["he"]["scalefactors"]
    assert sf["microns_per_pixel"] == 2.0 and sf["tissue_hires_scalef"] == pytest.approx(0.5)
    assert a.uns["spatial"]["he"]["metadata"]["microns_per_pixel_source"] == "given"


def test_a_given_scale_wins_over_the_file(tmp_path):
    a = agl.io.read_he_image(write_tiff(tmp_path, microns_per_pixel=0.5), microns_per_pixel=1.0)
    assert a.uns["spatial"]["he"]["scalefactors"]["microns_per_pixel"] == 1.0


def test_placeholder_dpi_is_not_a_scale(tmp_path):
    """72 dpi (353 µm/px) is a display default, not the scanner's scale: a clear error, not a wrong grid."""
    import tifffile

    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), resolution=(72, 72), resolutionunit="INCH")
    assert file_microns_per_pixel(path) is None
    with pytest.raises(ValueError, match="microns_per_pixel="):
        agl.io.read_he_image(path)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        agl.io.read_he_image(tmp_path / "nope.png", microns_per_pixel=1)
    with pytest.raises(ValueError, match="positive"):
        agl.io.read_he_image(write_png(tmp_path), microns_per_pixel=-1)


def test_svs_scale_comes_from_its_description(tmp_path):
    """tifffile no longer exports svs_description_metadata at its top level: the SVS MPP was an AttributeError."""
    import tifffile

    path = tmp_path / "he.svs"
    desc = "Aperio Image Library v12.0.15\n64x64 [0,0 64x64] (16x16) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2525"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), description=desc, tile=(16, 16), photometric="rgb")
    assert file_microns_per_pixel(path) == (pytest.approx(0.2525), "SVS MPP")
