"""A bare slide as SpatialData: an image element read as an H&E-only slide, grid predictions written as SpatialData."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from he_images import he_pixels, write_tiff

import agl_scverse as agl

sd = pytest.importorskip("spatialdata")
pytestmark = pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")


def he_spatialdata(mpp: float | None = 1.0, scale_factors=None):
    """The synthetic H&E as a SpatialData image ``he``, mapped to 'global' (pixels) and, with ``mpp``, to 'um'."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    tr = {"global": Identity(), **({"um": Scale([mpp, mpp], axes=("x", "y"))} if mpp else {})}
    image = Image2DModel.parse(
        he_pixels().transpose(2, 0, 1), dims=("c", "y", "x"), scale_factors=scale_factors, transformations=tr
    )
    return sd.SpatialData(images={"he": image})


@pytest.mark.parametrize("scale_factors", [None, [2]])
def test_an_image_element_reads_as_the_same_slide_as_its_file(tmp_path, scale_factors):
    sdata = he_spatialdata(1.0, scale_factors)
    slide = agl.io.read_he_image(sdata)
    entry = slide.uns["spatial"]["he"]
    assert entry["scalefactors"]["microns_per_pixel"] == pytest.approx(1.0)
    assert "'um'" in entry["metadata"]["microns_per_pixel_source"]
    assert agl.io.read_he_image(sdata.images["he"], library_id="el").uns["spatial"].keys() == {"el"}
    from_file = agl.io.read_he_image(write_tiff(tmp_path, microns_per_pixel=1.0))
    grid, ref = (agl.pp.spot_grid(s, spot_um=40, pitch_um=60) for s in (slide, from_file))
    np.testing.assert_array_equal(grid.obsm["spatial"], ref.obsm["spatial"])
    a, b = (agl.pp.SpotPatches(g, patch_px=16, patch_um=40) for g in (grid, ref))
    for i in (0, grid.n_obs // 2, grid.n_obs - 1):
        pa, pb = (np.asarray(p[i][0], dtype=float) for p in (a, b))
        if scale_factors is None:
            np.testing.assert_array_equal(pa, pb)  # the same pixels
        else:  # read from the element's level 1 (2 µm/px, nearest the patches' 2.5 µm/px), not resized from level 0
            assert a.level["he"] == 1 and np.abs(pa - pb).mean() < 0.05 * np.abs(pb).mean()


def test_an_image_element_without_a_scale(tmp_path):
    sdata = he_spatialdata(None)
    with pytest.raises(ValueError, match="no µm per pixel.*microns_per_pixel=.*'um'"):
        agl.io.read_he_image(sdata)
    assert agl.io.read_he_image(sdata, microns_per_pixel=0.5).uns["spatial"]["he"]["scalefactors"][
        "microns_per_pixel"
    ] == pytest.approx(0.5)
    two = sd.SpatialData(images={"a": sdata.images["he"], "b": sdata.images["he"]})
    with pytest.raises(ValueError, match="image_key="):
        agl.io.read_he_image(two, microns_per_pixel=1.0)
    assert agl.io.read_he_image(two, image_key="b", microns_per_pixel=1.0).uns["spatial"].keys() == {"b"}


def _fake_predictions(grid) -> ad.AnnData:
    values = np.random.default_rng(0).random((grid.n_obs, 3)).astype(np.float32)
    return ad.AnnData(values, obs=grid.obs, obsm=dict(grid.obsm), uns=dict(grid.uns))


def test_slide_to_spatialdata_round_trip(tmp_path):
    from agl_scverse.io._sd_slide import write_spatialdata

    grid = agl.pp.spot_grid(agl.io.read_he_image(write_tiff(tmp_path, microns_per_pixel=0.5)), spot_um=20, pitch_um=30)
    pred = _fake_predictions(grid)
    sdata = agl.io.slide_to_spatialdata(pred)
    assert set(sdata.images) == {"he"} and set(sdata.shapes) == {"he_grid"} and set(sdata.tables) == {"table"}
    write_spatialdata(sdata, tmp_path / "o.zarr")
    back = sd.read_zarr(tmp_path / "o.zarr")
    np.testing.assert_array_equal(back.tables["table"].X, pred.X)
    assert np.asarray(back.images["he"].transpose("y", "x", "c")).tolist() == he_pixels().tolist()
    again = agl.io.from_spatialdata(back)  # the reader finds the scale in the 'um' system, spots in pixels
    np.testing.assert_allclose(again.obsm["spatial"], pred.obsm["spatial"])
    assert again.uns["spatial"]["he"]["scalefactors"]["microns_per_pixel"] == pytest.approx(0.5)
    assert agl.io.slide_to_spatialdata(pred, image=False).images == {}


def test_write_spatialdata_is_all_or_nothing(tmp_path, monkeypatch):
    from agl_scverse.io._sd_slide import write_spatialdata

    grid = agl.pp.spot_grid(agl.io.read_he_image(write_tiff(tmp_path, microns_per_pixel=1.0)), spot_um=40, pitch_um=60)
    out = tmp_path / "o.zarr"
    write_spatialdata(agl.io.slide_to_spatialdata(_fake_predictions(grid), image=False), out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_spatialdata(agl.io.slide_to_spatialdata(_fake_predictions(grid), image=False), out)

    def half_written(self, path, *args, **kwargs):
        (path / "images").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(sd.SpatialData, "write", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_spatialdata(agl.io.slide_to_spatialdata(_fake_predictions(grid), image=False), out, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["he.tif", "o.zarr"]  # no temporary left
    assert sd.read_zarr(out).tables["table"].n_obs == grid.n_obs  # the old store, whole
