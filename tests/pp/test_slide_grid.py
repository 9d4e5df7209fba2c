"""agl.pp.tissue_mask and agl.pp.spot_grid on a tiny synthetic H&E image."""

from __future__ import annotations

import numpy as np
import pytest
from he_images import CENTRE, RADIUS, SIZE, he_pixels, write_ome_pyramid, write_png, write_tiff

import agl_scverse as agl


def test_tissue_mask_finds_the_blob(tmp_path):
    slide = agl.io.read_he_image(write_tiff(tmp_path, microns_per_pixel=1.0))
    tm = agl.pp.tissue_mask(slide, mask_um_per_px=10)
    assert tm.mask.shape == (60, 60) and tm.downsample == pytest.approx(10)
    assert tm.fraction == pytest.approx(np.pi * RADIUS**2 / SIZE**2, rel=0.05)
    cy, cx = CENTRE
    assert tm.contains(np.array([[cx, cy], [10, 10], [-5, 3], [SIZE + 9, 3]])).tolist() == [True, False, False, False]


def test_tissue_mask_of_a_pyramid_matches_the_flat_image(tmp_path):
    flat = agl.pp.tissue_mask(write_png(tmp_path), microns_per_pixel=0.5, mask_um_per_px=5)
    pyr = agl.pp.tissue_mask(agl.io.read_he_image(write_ome_pyramid(tmp_path, 0.5)), mask_um_per_px=5)
    assert pyr.mask.shape == flat.mask.shape == (60, 60)
    assert (pyr.mask == flat.mask).mean() > 0.98


def test_blank_image_has_no_tissue(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((300, 300, 3), 240, np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(ValueError, match="No tissue found"):
        agl.pp.tissue_mask(tmp_path / "blank.png", microns_per_pixel=1.0)
    with pytest.raises(ValueError, match="No tissue found"):
        agl.pp.spot_grid(tmp_path / "blank.png", microns_per_pixel=1.0)


def test_an_array_needs_its_scale():
    with pytest.raises(ValueError, match="microns_per_pixel="):
        agl.pp.tissue_mask(he_pixels())
    assert agl.pp.tissue_mask(he_pixels(), microns_per_pixel=1.0).mask.any()


@pytest.mark.parametrize("layout", ["hex", "square"])
def test_spot_grid_covers_the_tissue(tmp_path, layout):
    slide = agl.io.read_he_image(write_tiff(tmp_path, microns_per_pixel=1.0))
    grid = agl.pp.spot_grid(slide, spot_um=20, pitch_um=30, layout=layout)
    xy = grid.obsm["spatial"]
    r = np.hypot(xy[:, 0] - CENTRE[1], xy[:, 1] - CENTRE[0])
    assert (r < RADIUS + 15).all()  # on the tissue (mask pixels are 10 µm)
    cell = 30 * 30 * (np.sqrt(3) / 2 if layout == "hex" else 1)  # area per spot of the lattice
    assert grid.n_obs == pytest.approx(np.pi * RADIUS**2 / cell, rel=0.08)
    nn = np.sort(np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1)), axis=1)[:, 1]
    assert np.allclose(nn, 30)  # neighbours one pitch apart, hexagonal or square
    assert grid.n_vars == 0 and (grid.obs["in_tissue"] == 1).all()
    assert grid.obs["library_id"].cat.categories.tolist() == ["he"]
    sf = grid.uns["spatial"]["he"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(20) and sf["microns_per_pixel"] == 1.0
    assert grid.uns["agl_grid"]["layout"] == layout
    assert slide.uns["spatial"]["he"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(55)  # unchanged
    assert grid.obs_names.is_unique


def test_spot_grid_defaults_and_scale_follow_microns_per_pixel(tmp_path):
    """Visium defaults (55 µm spots, 100 µm pitch); at twice the µm/px the blob is four times the tissue area."""
    g1 = agl.pp.spot_grid(write_png(tmp_path), microns_per_pixel=1.0)
    g2 = agl.pp.spot_grid(write_png(tmp_path, "b.png"), microns_per_pixel=2.0)
    assert g1.uns["agl_grid"]["pitch_um"] == 100 and g1.uns["agl_grid"]["spot_um"] == 55
    assert 3 * g1.n_obs < g2.n_obs < 6 * g1.n_obs


def test_spot_grid_bad_inputs(tmp_path):
    slide = agl.io.read_he_image(write_tiff(tmp_path, microns_per_pixel=1.0))
    with pytest.raises(ValueError, match="smaller than a pixel"):
        agl.pp.spot_grid(slide, pitch_um=0.5)
    with pytest.raises(ValueError, match="layout"):
        agl.pp.spot_grid(slide, layout="triangle")
    with pytest.raises(ValueError, match="pitch_um"):
        agl.pp.spot_grid(slide, pitch_um=-3)
    with pytest.raises(ValueError, match="microns_per_pixel="):
        agl.pp.spot_grid(write_png(tmp_path))


def write_edge_png(folder) -> str:
    """A 300 px image cut from the middle of the blob: tissue reaches every edge."""
    from PIL import Image

    path = folder / "edge.png"
    Image.fromarray(he_pixels()[150:450, 150:450]).save(path)
    return path


def test_spot_grid_drops_points_whose_patch_runs_off_the_edge(tmp_path):
    """Tissue to the edges: points with less than half their patch inside are dropped, so patches cut cleanly."""
    from agl_scverse.pp._grid import _lattice

    slide = agl.io.read_he_image(write_edge_png(tmp_path), microns_per_pixel=1.0)
    grid = agl.pp.spot_grid(slide, spot_um=112, pitch_um=40)
    assert 0 < grid.n_obs < len(_lattice(300.0, 300.0, 40.0, "hex")[0])  # all on tissue: some dropped at the edge
    patches = agl.pp.SpotPatches(grid, patch_px=32, patch_um=112)  # on_outside="error": would raise before
    assert patches.inside_fraction.min() >= 0.5 and len(patches.outside) == 0
    xy = grid.obsm["spatial"]
    assert (xy.max(axis=0) > 300 - 56).all()  # points whose patch is partly outside stay
    big = agl.pp.spot_grid(slide, spot_um=112, pitch_um=80)  # another lattice: the same rule
    assert agl.pp.SpotPatches(big, patch_px=32, patch_um=112).inside_fraction.min() >= 0.5
    with pytest.raises(ValueError, match="smaller than a patch"):
        agl.pp.spot_grid(slide, spot_um=1000, pitch_um=100)
