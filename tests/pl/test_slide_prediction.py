"""agl.pl.slide_prediction: whole-slide maps of a grid's predictions, beside a section's measured expression."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import agl_scverse as agl

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.collections import EllipseCollection

GENES = ["G0", "G1", "G2"]


def _uns(lib: str = "S", diameter: float = 30.0) -> dict:
    img = np.full((100, 120, 3), 230, dtype=np.uint8)  # 400 x 480 full-res px at 0.25
    sf = {"tissue_hires_scalef": 0.25, "spot_diameter_fullres": diameter, "microns_per_pixel": 1.0}
    return {lib: {"images": {"hires": img}, "scalefactors": sf}}


def make_pred(seed: int = 0) -> AnnData:
    """A hexagonal-ish grid of 20 px pitch over 100..300 x 100..260 px with smooth predictions in .X."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(100, 301, 20.0), np.arange(100, 261, 20.0))
    xy = np.c_[gx.ravel(), gy.ravel()]
    X = np.c_[xy[:, 0] / 100, xy[:, 1] / 100, rng.normal(size=len(xy))].astype(np.float32)
    pred = AnnData(X, obs=pd.DataFrame(index=[f"g{i}" for i in range(len(xy))]), var=pd.DataFrame(index=GENES))
    pred.obsm["spatial"] = xy
    pred.obs["library_id"] = pd.Categorical(["S"] * len(xy))
    pred.uns["spatial"] = _uns(diameter=60.0)  # wider than the pitch: drawn at the pitch
    pred.uns["agl_pred"] = {"scale": "model", "transform": "log1p", "observed": False}
    return pred


def make_measured(seed: int = 1) -> AnnData:
    """Measured counts at 60 px spacing over the same section (a few genes more than predicted)."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(90, 311, 60.0), np.arange(90, 271, 60.0))
    xy = np.c_[gx.ravel(), gy.ravel()]
    counts = rng.poisson(np.c_[xy[:, 0] / 20, xy[:, 1] / 20, np.full(len(xy), 3.0), np.ones(len(xy))])
    names = [*GENES, "OTHER"]
    m = AnnData(counts.astype(np.float32), obs=pd.DataFrame(index=[f"m{i}" for i in range(len(xy))]))
    m.var_names = names
    m.obsm["spatial"] = xy
    m.uns["spatial"] = _uns()
    return m


def _colls(a) -> list[EllipseCollection]:
    return [c for c in a.collections if isinstance(c, EllipseCollection)]


def test_panels_and_shape():
    pred, measured = make_pred(), make_measured()
    axs = agl.pl.slide_prediction(pred, ["G0", "G1"], show=False)
    assert axs.shape == (2, 1)
    assert [a.get_title() for a in axs[:, 0]] == [f"{g} predicted ({pred.n_obs} spots)" for g in ("G0", "G1")]
    assert all(len(_colls(a)) == 1 and len(a.images) == 1 for a in axs.ravel())  # spots over the image
    axs = agl.pl.slide_prediction(pred, GENES, measured=measured, show=False)
    assert axs.shape == (3, 2)
    assert axs[0, 0].get_title() == f"G0 measured (S, {measured.n_obs} spots)"
    assert axs[0, 0].figure.get_axes()[-1] not in axs.ravel()  # a colour bar per row, extra axes
    assert len(axs[0, 0].figure.get_axes()) == 6 + 3
    fig, given = plt.subplots(1, 3)
    out = agl.pl.slide_prediction(pred, GENES, ax=given, show=False)
    assert list(out.ravel()) == list(given) and out.shape == (3, 1)
    with pytest.raises(ValueError, match="6 Axes"):
        agl.pl.slide_prediction(pred, GENES, measured=measured, ax=given, show=False)
    assert isinstance(agl.pl.slide_prediction(pred, "G0", return_fig=True, show=False), plt.Figure)
    plt.close("all")


@pytest.mark.parametrize("robust", [True, False])
def test_one_colour_range_per_gene_over_both_panels(robust):
    pred, measured = make_pred(), make_measured()
    axs = agl.pl.slide_prediction(pred, ["G0", "G2"], measured=measured, robust=robust, show=False)
    q = (1, 99) if robust else (0, 100)
    for row, gene in zip(axs, ["G0", "G2"]):
        (m,), (p,) = _colls(row[0]), _colls(row[1])
        assert (m.norm.vmin, m.norm.vmax) == (p.norm.vmin, p.norm.vmax)
        both = np.r_[np.log1p(measured[:, gene].X.ravel()), pred[:, gene].X.ravel()]
        assert (p.norm.vmin, p.norm.vmax) == pytest.approx(tuple(np.percentile(both, q)), rel=1e-6)
        np.testing.assert_allclose(m.get_array(), np.log1p(measured[:, gene].X.ravel()), rtol=1e-6)
    assert _colls(axs[0, 1])[0].norm.vmax != _colls(axs[1, 1])[0].norm.vmax  # each gene its own range
    plt.close("all")


def test_same_extent_and_r_at_the_nearest_grid_spot():
    from scipy.spatial import cKDTree

    pred, measured = make_pred(), make_measured()
    axs = agl.pl.slide_prediction(pred, "G0", measured=measured, show=False)
    a, b = axs[0]
    assert a.get_xlim() == b.get_xlim() and a.get_ylim() == b.get_ylim()
    lo = measured.obsm["spatial"].min(0) - 30.0  # the measured spots reach further; margin of one spot
    assert a.get_xlim()[0] == pytest.approx(lo[0]) and a.get_ylim()[1] == pytest.approx(lo[1])  # y down
    nearest = cKDTree(pred.obsm["spatial"]).query(measured.obsm["spatial"])[1]
    r = np.corrcoef(np.log1p(measured[:, "G0"].X.ravel()), pred[:, "G0"].X.ravel()[nearest])[0, 1]
    assert b.get_title().endswith(f"r = {r:.3f} at {measured.n_obs} measured spots")
    full = agl.pl.slide_prediction(pred, "G0", measured=measured, crop=False, show=False)[0, 1]
    assert full.get_xlim() == pytest.approx((0, 480)) and full.get_ylim() == pytest.approx((400, 0))
    plt.close("all")


def test_clear_errors():
    pred, measured = make_pred(), make_measured()
    with pytest.raises(KeyError, match=r"\['NOPE'\] have no predictions.*genes='all'"):
        agl.pl.slide_prediction(pred, ["G0", "NOPE"], show=False)
    measured_less = measured[:, ["G0", "OTHER"]].copy()
    with pytest.raises(KeyError, match=r"\['G1'\] are not in measured.var_names.*measured=None"):
        agl.pl.slide_prediction(pred, ["G0", "G1"], measured=measured_less, show=False)
    with pytest.raises(ValueError, match="genes is empty"):
        agl.pl.slide_prediction(pred, [], show=False)
    two = make_measured()
    two.obs["library_id"] = pd.Categorical(["S", "T"] * (two.n_obs // 2))
    two.uns["spatial"] = {**_uns("S"), **_uns("T")}
    pred_t = make_pred()
    pred_t.obs["library_id"] = pd.Categorical(["T"] * pred_t.n_obs)
    pred_t.uns["spatial"] = _uns("T")
    axs = agl.pl.slide_prediction(pred_t, "G0", measured=two, show=False)  # the prediction's slide is used
    assert axs[0, 0].get_title() == f"G0 measured (T, {two.n_obs // 2} spots)"
    with pytest.raises(KeyError, match="library_id='U'"):
        agl.pl.slide_prediction(pred, "G0", measured=two, library_id="U", show=False)
    with pytest.raises(TypeError, match="predict_anndata"):
        agl.pl.slide_prediction(pred.X, "G0")
    plt.close("all")


def test_on_a_predict_anndata_grid_of_the_synthetic_slide(tmp_path):
    """End to end: fit on the synthetic slide's patches, grid its image, predict, map beside the measured slide."""
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    measured = agl.datasets.synthetic_slide(
        n_rows=5, n_cols=5, seed=0, n_tissue_genes=10, n_informative=10, n_noise=20, n_bursty_noise=2
    )
    encoder = agl.EncoderConfig("resnet18", patch_px=32, backend="torch")
    model = agl.tl.agl_fit(
        measured,
        method="agl",
        encoder=encoder,
        genes=agl.GeneConfig(n_targets=3, min_cells=1),
        network=agl.NetworkConfig(hidden=(16,)),
        training=agl.TrainingConfig(epochs=1, batch_size=32),
        progress=False,
    )
    Image.fromarray(measured.uns["spatial"]["synthetic"]["images"]["fullres"]).save(tmp_path / "he.png")
    slide = agl.io.read_he_image(tmp_path / "he.png", microns_per_pixel=1.0, library_id="synthetic")
    grid = agl.pp.spot_grid(slide, pitch_um=40, model=model)
    pred = agl.tl.predict_anndata(grid, model, encoder=encoder, device="cpu", progress=False)
    genes = list(model.targets[:2])
    axs = agl.pl.slide_prediction(pred, genes, measured=measured, show=False, save=tmp_path / "map.png")
    assert axs.shape == (2, 2) and (tmp_path / "map.png").stat().st_size > 0
    for row, gene in zip(axs, genes):
        np.testing.assert_allclose(_colls(row[1])[0].get_array(), np.asarray(pred[:, gene].X).ravel(), rtol=1e-6)
        assert f"at {measured.n_obs} measured spots" in row[1].get_title()
    plt.close("all")


@pytest.mark.filterwarnings("ignore:The table is annotating:UserWarning")
def test_a_spatialdata_needs_a_table_of_predictions():
    sd = pytest.importorskip("spatialdata")
    from spatialdata.models import TableModel

    pred = make_pred()
    bare = AnnData(pred.X.copy(), obs=pred.obs[[]].assign(region="grid", instance_id=np.arange(pred.n_obs)))
    bare.obs["region"] = bare.obs["region"].astype("category")
    bare.var_names = pred.var_names
    table = TableModel.parse(bare, region="grid", region_key="region", instance_key="instance_id")
    with pytest.raises(ValueError, match=r"no \.obsm\['spatial'\].*from_spatialdata"):
        agl.pl.slide_prediction(sd.SpatialData(tables={"t": table}), "G0", show=False)
    with pytest.raises(ValueError, match="table_key="):
        agl.pl.slide_prediction(sd.SpatialData(tables={"a": table, "b": table.copy()}), "G0", show=False)
    with pytest.raises(KeyError, match="tables are"):
        agl.pl.slide_prediction(sd.SpatialData(tables={"t": table}), "G0", table_key="x", show=False)


def _figure_arrays(axs) -> list:
    """What each panel draws: titles, limits, the image pixels, and each spot collection's values, centres, sizes, norm."""
    out = []
    for a in np.ravel(axs):
        out += [a.get_title(), a.get_xlim(), a.get_ylim(), [np.asarray(im.get_array()) for im in a.images]]
        for c in _colls(a):
            out += [np.asarray(c.get_array()), c.get_offsets(), c._widths, (c.norm.vmin, c.norm.vmax)]
    return out


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
@pytest.mark.filterwarnings("ignore:The table is annotating:UserWarning")
def test_measured_may_be_a_spatialdata(tmp_path):
    """measured= as a SpatialData (table by measured_table_key=, as for pred's table_key=) draws the AnnData's figure."""
    sd = pytest.importorskip("spatialdata")
    pred, measured = make_pred(), make_measured()
    sdata = agl.io.slide_to_spatialdata(measured, image=False, table_key="counts")
    sdata.write(tmp_path / "measured.zarr")
    sdata = sd.read_zarr(tmp_path / "measured.zarr")
    ref = agl.pl.slide_prediction(pred, ["G0", "G2"], measured=measured, show=False)
    got = agl.pl.slide_prediction(pred, ["G0", "G2"], measured=sdata, show=False)
    named = agl.pl.slide_prediction(pred, ["G0", "G2"], measured=sdata, measured_table_key="counts", show=False)
    pred_sd = agl.pl.slide_prediction(
        agl.io.slide_to_spatialdata(pred, image=False), ["G0", "G2"], measured=sdata, table_key="table", show=False
    )
    want = _figure_arrays(ref)
    assert len(want) == 2 * 2 * 8 and want[0] == "G0 measured (S, 16 spots)"
    for axs in (got, named, pred_sd):
        for a, b in zip(_figure_arrays(axs), want, strict=True):
            if isinstance(b, str):
                assert a == b
            elif isinstance(b, list):
                assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
            else:
                np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-12)
    two = sd.SpatialData(tables={"counts": sdata.tables["counts"], "other": sdata.tables["counts"].copy()})
    with pytest.raises(ValueError, match="measured_table_key="):
        agl.pl.slide_prediction(pred, "G0", measured=two, show=False)
    with pytest.raises(KeyError, match="measured_table_key='x' is not a table"):
        agl.pl.slide_prediction(pred, "G0", measured=two, measured_table_key="x", show=False)
    bare = sdata.tables["counts"].copy()
    del bare.obsm["spatial"]
    with pytest.raises(ValueError, match=r"no \.obsm\['spatial'\].*from_spatialdata.*measured counts"):
        agl.pl.slide_prediction(pred, "G0", measured=sd.SpatialData(tables={"t": bare}), show=False)
    with pytest.raises(TypeError, match="AnnData or a SpatialData of measured counts"):
        agl.pl.slide_prediction(pred, "G0", measured=measured.X, show=False)
    plt.close("all")
