"""agl.io.from_spatialdata and SpatialData input to the tools."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from builders import make_sdata

import agl_scverse as agl
from agl_scverse import _spatial


# --- SpatialData ----------------------------------------------------------------------------------------------
def _sdata_snapshot(sdata) -> dict:
    t = sdata.tables["table"]
    return {
        "X": np.asarray(t.X).copy(),
        "obs": t.obs.copy(),
        "uns": repr(t.uns),
        "obsm": sorted(t.obsm),
        "shapes": sdata.shapes["spots"].copy(),
        "images": {k: repr(v) for k, v in sdata.images.items()},
    }


def _assert_same(sdata, snap: dict) -> None:
    t = sdata.tables["table"]
    np.testing.assert_array_equal(np.asarray(t.X), snap["X"])
    pd.testing.assert_frame_equal(t.obs, snap["obs"])
    assert repr(t.uns) == snap["uns"] and sorted(t.obsm) == snap["obsm"]
    pd.testing.assert_frame_equal(sdata.shapes["spots"], snap["shapes"])
    assert {k: repr(v) for k, v in sdata.images.items()} == snap["images"]


def test_from_spatialdata(tmp_path):
    sdata = make_sdata()
    snap = _sdata_snapshot(sdata)
    with pytest.raises(ValueError, match="physical scale of image 'he'.*unknown"):
        agl.io.from_spatialdata(sdata)  # nothing gives the scale: no guess from a 65 µm spot
    adata = agl.io.from_spatialdata(sdata, spot_diameter_um=65.0)
    _assert_same(sdata, snap)
    assert list(adata.obs_names) == ["a", "b", "c"]
    # table rows name instances 12, 10, 11 -> global (100, 80), (40, 30), (60, 50) -> image px = global / 2
    np.testing.assert_allclose(adata.obsm["spatial"], [[50, 40], [20, 15], [30, 25]])
    np.testing.assert_array_equal(adata.X.toarray(), sdata.tables["table"].X)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    entry = adata.uns["spatial"]["he"]
    sf = entry["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(5.0)  # radius 5 global = 2.5 image px
    assert sf["microns_per_pixel"] == pytest.approx(65 / 5.0)  # 65 µm / circle diameter, as asked
    assert entry["images"]["hires"].shape == (60, 80, 3) and sf["tissue_hires_scalef"] == 1.0
    img, scale, which = _spatial.get_image(adata, "he")
    assert which == "fullres" and img.shape == (60, 80, 3)
    np.testing.assert_array_equal(img, sdata.images["he"].values.transpose(1, 2, 0))
    assert "spatialdata_attrs" not in adata.uns
    # same thing through the shared coercion helper
    from agl_scverse.io._spatialdata import as_anndata

    with pytest.raises(ValueError, match="unknown"):
        as_anndata(sdata)


def test_from_spatialdata_multiscale_hires():
    sdata = make_sdata(multiscale=True, size=(120, 160))
    adata = agl.io.from_spatialdata(
        sdata,
        image_key="he",
        shapes_key="spots",
        table_key="table",
        library_id="s1",
        microns_per_pixel=0.5,
        hires_max_px=50,
        fullres_max_px=100,
    )
    entry = adata.uns["spatial"]["s1"]
    hires = entry["images"]["hires"]
    assert max(hires.shape[:2]) == 50 and "fullres" not in entry["images"]
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(50 / 160)
    assert entry["scalefactors"]["microns_per_pixel"] == 0.5


def test_from_spatialdata_errors():
    sdata = make_sdata()
    snap = _sdata_snapshot(sdata)
    with pytest.raises(KeyError, match="available tables"):
        agl.io.from_spatialdata(sdata, table_key="nope")
    with pytest.raises(KeyError, match="available images"):
        agl.io.from_spatialdata(sdata, image_key="nope")
    with pytest.raises(KeyError, match="available shapes"):
        agl.io.from_spatialdata(sdata, shapes_key="nope")
    with pytest.raises(ValueError, match="positive"):
        agl.io.from_spatialdata(sdata, microns_per_pixel=-1)
    _assert_same(sdata, snap)
    with pytest.raises(ValueError, match="No image element"):
        agl.io.from_spatialdata(make_sdata(image=False), microns_per_pixel=1.0)
    with pytest.raises(ValueError, match="grayscale"):
        agl.io.from_spatialdata(make_sdata(channels=1), microns_per_pixel=1.0)
    with pytest.raises(ValueError, match="outside"):
        agl.io.from_spatialdata(make_sdata(size=(30, 40)), microns_per_pixel=1.0)
    sdata = make_sdata(obs_names=("a", "a", "c"))
    snap = _sdata_snapshot(sdata)
    with pytest.raises(ValueError, match="Duplicate spot barcodes"):
        agl.io.from_spatialdata(sdata, microns_per_pixel=1.0)
    _assert_same(sdata, snap)
    X = np.ones((3, 3), dtype=np.float32)
    X[1, 1] = -2
    with pytest.raises(ValueError, match="negative"):
        agl.io.from_spatialdata(make_sdata(X=X), microns_per_pixel=1.0)
    # a table annotating the image (not shapes)
    with pytest.raises(ValueError, match="not shapes"):
        agl.io.from_spatialdata(make_sdata(table_region="he"), microns_per_pixel=1.0)
    with pytest.raises(TypeError, match="SpatialData"):
        agl.io.from_spatialdata(AnnData(np.ones((2, 2))))


def _sdata_of(adata):
    """A SpatialData holding ``adata`` as its table, spots as circles (radius 20 px) on a random image."""
    import geopandas as gpd  # noqa: F401  (spatialdata's dependency)
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    h, w = int(xy[:, 1].max()) + 100, int(xy[:, 0].max()) + 100
    img = Image2DModel.parse(
        np.random.default_rng(0).integers(0, 255, (3, h, w), dtype=np.uint8),
        dims=("c", "y", "x"),
        transformations={"global": Identity(), "um": Scale([0.5, 0.5], axes=("y", "x"))},  # 0.5 µm per pixel
    )
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), 20.0), index=np.arange(len(xy)))
    table = adata.copy()
    table.obs["region"] = pd.Categorical(["spots"] * table.n_obs)
    table.obs["instance"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="instance")
    return SpatialData(images={"he": img}, shapes={"spots": shapes}, tables={"table": table})


def test_tools_write_their_results_into_the_spatialdata_table():
    """agl_fit / agl_predict / embed on a SpatialData write into its table (as squidpy does), so sdata.write keeps them."""
    from builders import FAST, small_slide

    a = small_slide()
    sdata = _sdata_of(a)
    model = agl.tl.agl_fit(sdata, method="agl", embedding_key="X_emb", n_targets=5, min_cells=1, **FAST)
    table = sdata.tables["table"]
    assert isinstance(model, agl.model.AGLModel)
    assert (table.var["agl_role"].astype(str) == "target").sum() == 5
    assert set(table.obs["agl_split"].astype(str)) <= {"train", "val"} and "agl" in table.uns
    assert agl.tl.agl_predict(sdata, model) is None
    pred = table.layers["agl_pred"]
    assert pred.shape == table.shape and np.isfinite(pred[:, table.var_names.isin(model.targets)]).all()


def test_results_survive_sdata_write_and_read(tmp_path):
    """agl_fit / agl_predict results in the table survive sdata.write -> read_zarr; patches then come from the store."""
    import spatialdata as sd
    from builders import FAST, small_slide

    a = small_slide()
    sdata = _sdata_of(a)
    model = agl.tl.agl_fit(sdata, method="agl", embedding_key="X_emb", n_targets=5, min_cells=1, **FAST)
    agl.tl.agl_predict(sdata, model)
    before = sdata.tables["table"]
    sdata.write(tmp_path / "run.zarr")
    back = sd.read_zarr(tmp_path / "run.zarr").tables["table"]
    pd.testing.assert_series_equal(
        back.var["agl_role"].astype(str), before.var["agl_role"].astype(str), check_names=False
    )
    np.testing.assert_allclose(back.var["agl_weight"], before.var["agl_weight"])
    np.testing.assert_array_equal(np.asarray(back.layers["agl_pred"]), np.asarray(before.layers["agl_pred"]))
    assert back.uns["agl"]["k"] == before.uns["agl"]["k"] and back.uns["agl"]["params"]["method"] == "agl"
    assert len(back.uns["agl"]["history"]["epoch"]) == len(before.uns["agl"]["history"]["epoch"])
    # an AnnData read from the stored object keeps a route to the full-resolution image after the object is gone
    sdata2 = sd.read_zarr(tmp_path / "run.zarr")
    adata = agl.io.from_spatialdata(sdata2)
    meta = adata.uns["spatial"]["he"]["metadata"]
    assert meta["spatialdata_path"] == str((tmp_path / "run.zarr").resolve())
    meta["spatialdata_image_token"] = "gone"
    adata.uns["spatial"]["he"]["images"].pop("fullres", None)
    src, _, which = _spatial.get_image(adata, "he")
    assert which == "fullres" and src.kind == "lazy"
    np.testing.assert_array_equal(np.asarray(src), sdata.images["he"].values.transpose(1, 2, 0))
