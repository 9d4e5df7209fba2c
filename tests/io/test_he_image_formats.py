"""agl.io.read_he_image on a JPEG and an SVS: each a slide whose grid matches the same pixels in a flat TIFF."""

from __future__ import annotations

import numpy as np
import pytest
from he_images import SIZE, he_pixels, write_tiff

import agl_scverse as agl


def test_a_jpeg_needs_its_scale_and_grids_like_the_tiff(tmp_path):
    """A JPEG records no µm/px: a clear error naming microns_per_pixel=, then the slide of the given scale."""
    from PIL import Image

    path = tmp_path / "he.jpg"
    Image.fromarray(he_pixels()).save(path, quality=95)
    with pytest.raises(ValueError, match="microns_per_pixel="):
        agl.io.read_he_image(path)
    slide = agl.io.read_he_image(path, microns_per_pixel=1.0)
    entry = slide.uns["spatial"]["he"]
    assert entry["scalefactors"]["microns_per_pixel"] == 1.0
    assert entry["metadata"]["microns_per_pixel_source"] == "given"
    assert (entry["metadata"]["image_width"], entry["metadata"]["image_height"]) == (SIZE, SIZE)
    grid = agl.pp.spot_grid(slide, spot_um=20, pitch_um=30)
    ref = agl.pp.spot_grid(agl.io.read_he_image(write_tiff(tmp_path, microns_per_pixel=1.0)), spot_um=20, pitch_um=30)
    assert abs(grid.n_obs - ref.n_obs) <= 0.03 * ref.n_obs  # JPEG loss moves the tissue edge by a pixel or so
    patch = np.asarray(agl.pp.SpotPatches(grid, patch_px=16, patch_um=20)[grid.n_obs // 2][0], dtype=float)
    assert patch.shape[-2:] == (16, 16) and np.isfinite(patch).all()


def test_an_svs_reads_its_scale_and_grids_like_the_tiff(tmp_path):
    """An Aperio SVS (tiled TIFF, MPP in its description): µm/px from the file, the TIFF's grid and pixels."""
    import tifffile

    path = tmp_path / "he.svs"
    desc = f"Aperio Image Library v12.0.15\n{SIZE}x{SIZE} [0,0 {SIZE}x{SIZE}] (128x128) RAW|AppMag = 10|MPP = 1.0"
    tifffile.imwrite(path, he_pixels(), description=desc, tile=(128, 128), photometric="rgb")
    slide = agl.io.read_he_image(path)
    entry = slide.uns["spatial"]["he"]
    assert entry["scalefactors"]["microns_per_pixel"] == pytest.approx(1.0)
    assert entry["metadata"]["microns_per_pixel_source"] == "SVS MPP"
    grid = agl.pp.spot_grid(slide, spot_um=20, pitch_um=30)
    ref_slide = agl.io.read_he_image(write_tiff(tmp_path, microns_per_pixel=1.0))
    ref = agl.pp.spot_grid(ref_slide, spot_um=20, pitch_um=30)
    np.testing.assert_array_equal(grid.obsm["spatial"], ref.obsm["spatial"])
    a, b = (agl.pp.SpotPatches(g, patch_px=16, patch_um=20) for g in (grid, ref))
    np.testing.assert_array_equal(np.asarray(a[0][0]), np.asarray(b[0][0]))  # the same pixels
    assert agl.io.read_he_image(path, microns_per_pixel=0.5).uns["spatial"]["he"]["scalefactors"][
        "microns_per_pixel"
    ] == pytest.approx(0.5)  # a given scale wins
