"""Plots render to files and show what they claim: labels, threshold position, PCC in titles, clear errors."""

from __future__ import annotations

import re

import matplotlib
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import agl_scverse as agl
from agl_scverse._constants import LIBRARY_KEY, Keys

matplotlib.use("Agg")
import matplotlib.pyplot as plt

N_TGT, N_AUX, N_EXC = 5, 40, 3
THETA = 0.3


def _slide_uns(rng, n_side=12, spacing=20.0):
    img = (rng.random((60, 60, 3)) * 255).astype(np.uint8)
    return {
        "images": {"hires": img},
        "scalefactors": {"tissue_hires_scalef": 0.2, "spot_diameter_fullres": 10.0, "microns_per_pixel": 1.0},
    }


def make_adata(key: str = "agl", n_slides: int = 1, seed: int = 0) -> AnnData:
    """A small AnnData following the AGL contract of agl_scverse._constants (fit + predict + evaluate)."""
    rng = np.random.default_rng(seed)
    side = 8
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    xy1 = np.c_[gx.ravel(), gy.ravel()] * 30.0 + 20.0
    xy = np.vstack([xy1] * n_slides)
    n_obs = len(xy)
    n_var = N_TGT + N_AUX + N_EXC
    counts = rng.poisson(3.0, size=(n_obs, n_var)).astype(np.float32)
    names = [f"T{i}" for i in range(N_TGT)] + [f"A{i:02d}" for i in range(N_AUX)] + [f"X{i}" for i in range(N_EXC)]
    ad = AnnData(counts, obs=pd.DataFrame(index=[f"s{i}" for i in range(n_obs)]), var=pd.DataFrame(index=names))
    ad.obsm["spatial"] = xy
    libs = [f"slide{i}" for i in range(n_slides)]
    ad.obs[LIBRARY_KEY] = pd.Categorical(np.repeat(libs, len(xy1)), categories=libs)
    ad.uns["spatial"] = {lib: _slide_uns(rng) for lib in libs}
    k = Keys(key)
    role = ["target"] * N_TGT + ["auxiliary"] * N_AUX + ["excluded"] * N_EXC
    ad.var[k.role] = pd.Categorical(role, categories=["target", "auxiliary", "excluded"])
    aux_rank = rng.permutation(N_AUX)
    prior = np.full(n_var, np.nan)
    prior[N_TGT : N_TGT + N_AUX] = 1.0 - aux_rank / N_AUX
    rank = np.full(n_var, -1, dtype=int)
    rank[N_TGT : N_TGT + N_AUX] = aux_rank
    r = aux_rank / (N_AUX - 1)
    weight = np.zeros(n_var)
    weight[:N_TGT] = 1.0
    weight[N_TGT : N_TGT + N_AUX] = 1.0 / (1.0 + np.exp(-(THETA - r) / 0.01))
    selected = np.zeros(n_var, dtype=bool)
    selected[N_TGT : N_TGT + N_AUX] = r < THETA
    ad.var[k.prior], ad.var[k.prior_rank], ad.var[k.weight], ad.var[k.selected] = prior, rank, weight, selected
    obs_log = np.log1p(counts)
    pred = obs_log + rng.normal(0, 0.8, size=obs_log.shape)
    pred[:, N_TGT + N_AUX :] = 0.0  # the layer's contract: 0 where not predicted, the mask says which genes are
    ad.layers[k.pred_layer] = pred.astype(np.float32)
    ad.var[k.predicted] = np.arange(n_var) < N_TGT + N_AUX
    ad.uns[k.pred_uns] = {"scale": "model", "transform": "log1p", "observed": True, "n_genes": N_TGT + N_AUX}
    pcc = np.full(n_var, np.nan)
    pcc[:N_TGT] = rng.uniform(0.1, 0.6, N_TGT)
    ad.var[k.pcc], ad.var[k.spearman], ad.var[k.mse] = pcc, pcc * 0.9, np.where(np.isnan(pcc), np.nan, 0.5)
    epochs = list(range(6))
    ad.uns[k.uns] = {
        "params": {"transform": "log1p", "layer": "None", "seed": 0},  # None stored as "None", as agl_fit does
        "k": int(selected.sum()),
        "threshold": THETA,
        "n_auxiliary": N_AUX,
        "history": {
            "epoch": epochs,
            "train_loss": [1.0 / (e + 1) for e in epochs],
            "val_pcc": [0.1, 0.2, 0.35, 0.3, 0.32, 0.31],
            "k": [None, 20, 16, 13, 12, 12],
            "theta": [0.5, 0.5, 0.4, 0.33, 0.3, 0.3],
        },
        "metrics": {"model": {"pearson_mean": 0.35}, "mean": {"pearson_mean": 0.0}, "pca_ridge": {"pearson_mean": 0.2}},
    }
    return ad


@pytest.fixture
def adata() -> AnnData:
    return make_adata()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text)]


# --- selected_genes ---------------------------------------------------------------------------------------
def test_selected_genes_threshold_labels_and_targets(adata, tmp_path):
    out = tmp_path / "sel.png"
    ax = agl.pl.selected_genes(adata, n_labels=4, show=False, save=out)
    assert out.stat().st_size > 1000
    # threshold line at theta * (n_aux - 1) on the prior-rank axis
    k = Keys()
    vlines = [ln for ln in ax.get_lines() if len(set(np.asarray(ln.get_xdata(), dtype=float))) == 1]
    assert len(vlines) == 1
    assert float(vlines[0].get_xdata()[0]) == pytest.approx(THETA * (N_AUX - 1))
    # the 4 best-ranked selected auxiliary genes are labelled, and no other gene
    aux = adata.var[adata.var[k.role] == "auxiliary"].sort_values(k.prior_rank)
    top = list(aux.index[aux[k.selected]][:4])
    labels = {t.get_text() for t in ax.texts}
    assert labels == set(top)
    # targets are a separate legend entry with their count, selected count in the legend too
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"targets ({N_TGT})" in legend
    assert f"selected ({int(aux[k.selected].sum())})" in legend
    # all auxiliary genes are drawn at their rank: x of the plotted points covers 0 .. n_aux - 1
    xs = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections[:2]])
    assert sorted(xs.tolist()) == list(range(N_AUX))
    assert all(x < 0 for x in ax.collections[2].get_offsets()[:, 0])  # target band left of rank 0


def test_selected_genes_with_history_and_key(tmp_path):
    ad = make_adata(key="run2")
    axs = agl.pl.selected_genes(ad, key="run2", show_history=True, show=False, save=tmp_path / "s2.pdf")
    assert len(axs) == 2
    assert (tmp_path / "s2.pdf").exists()
    y = axs[1].get_lines()[0].get_ydata()
    assert np.isnan(y[0]) and list(y[1:]) == [20, 16, 13, 12, 12]
    assert axs[1].get_lines()[1].get_xdata()[0] == 2  # kept epoch (best validation PCC) marked
    with pytest.raises(KeyError, match="key='agl'"):
        agl.pl.selected_genes(ad, show=False)  # run stored under run2


def test_selected_genes_errors(adata):
    del adata.var[Keys().weight]
    with pytest.raises(KeyError, match="agl_weight"):
        agl.pl.selected_genes(adata, show=False)
    with pytest.raises(KeyError, match="agl_fit"):
        agl.pl.selected_genes(AnnData(np.zeros((3, 2))), show=False)


# --- training_history -------------------------------------------------------------------------------------
def test_training_history(adata, tmp_path):
    axs = agl.pl.training_history(adata, show=False, save=tmp_path / "h.png")
    assert (tmp_path / "h.png").exists()
    assert len(axs) == 3
    assert [a.get_title() for a in axs] == ["training loss", "validation PCC (targets)", "selected auxiliary genes"]
    assert list(axs[1].get_lines()[0].get_ydata()) == [0.1, 0.2, 0.35, 0.3, 0.32, 0.31]
    assert any("kept epoch 2: PCC 0.350" in t for t in _texts(axs[1]))  # no best_epoch recorded: best val PCC
    adata.uns["agl"]["metrics"]["best_epoch"] = 4  # recorded by the fit: that epoch is marked
    axs = agl.pl.training_history(adata, show=False)
    assert any("kept epoch 4: PCC 0.320" in t for t in _texts(axs[1]))
    assert [ln.get_xdata()[0] for ln in axs[2].get_lines()[1:]] == [4]
    del adata.uns["agl"]["history"]["val_pcc"]
    with pytest.raises(KeyError, match="val_pcc"):
        agl.pl.training_history(adata, show=False)
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="3 Axes"):
        agl.pl.training_history(make_adata(), ax=ax, show=False)


# --- gene_performance -------------------------------------------------------------------------------------
def _cv_table(seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(3):
        for m, shift in [("mean", -0.3), ("pca_ridge", 0.0), ("pgl", 0.05), ("agl", 0.1)]:
            for g in range(8):
                p = 0.2 + shift + 0.02 * g + rng.normal(0, 0.01)
                rows.append(
                    {"fold": fold, "method": m, "gene": f"G{g}", "pearson": p, "spearman": p, "mse": 1 - p, "k": 3}
                )
    return pd.DataFrame(rows)


def test_gene_performance_table_scatter(tmp_path):
    df = _cv_table()
    ax = agl.pl.gene_performance(df, key="agl", baseline="pgl", n_labels=3, show=False, save=tmp_path / "gp.png")
    assert (tmp_path / "gp.png").exists()
    x, y = np.concatenate([c.get_offsets() for c in ax.collections]).T
    per_gene = df.groupby(["method", "gene"])["pearson"].mean()
    assert sorted(y.tolist()) == pytest.approx(sorted(per_gene["agl"].tolist()))
    assert sorted(x.tolist()) == pytest.approx(sorted(per_gene["pgl"].tolist()))
    gain = (per_gene["agl"] - per_gene["pgl"]).sort_values(ascending=False)
    assert {t.get_text() for t in ax.texts} == set(gain.index[:3])
    assert "better on 8/8 genes" in ax.get_title()


def test_gene_performance_box_and_errors():
    df = _cv_table()
    ax = agl.pl.gene_performance(df, show=False)  # default: box of every method, model first
    assert [t.get_text() for t in ax.get_xticklabels()] == ["agl", "mean", "pca_ridge", "pgl"]
    with pytest.raises(KeyError, match="dkgsb"):
        agl.pl.gene_performance(df, key="dkgsb", show=False)
    with pytest.raises(KeyError, match="method"):
        agl.pl.gene_performance(df.drop(columns="method"), show=False)
    with pytest.raises(ValueError, match="exactly one baseline"):
        agl.pl.gene_performance(df, kind="scatter", show=False)


def test_gene_performance_anndata(adata, tmp_path):
    ax = agl.pl.gene_performance(adata, show=False, save=tmp_path / "bar.png")
    heights = [p.get_height() for p in ax.patches]
    assert heights == sorted(adata.var[Keys().pcc].dropna(), reverse=True)
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "pca_ridge mean 0.200" in legend and "mean mean 0.000" in legend
    # the layout agl.tl.evaluate writes: metrics["test"][method] with plain metric names
    adata.uns["agl"]["metrics"] = {
        "val_pcc": 0.5,
        "test": {
            "model": {"pearson": 0.35},
            "mean_predictor": {"pearson": float("nan")},
            "pca_ridge": {"pearson": 0.25},
        },
    }
    ax = agl.pl.gene_performance(adata, show=False)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == [
        f"agl (mean {adata.var['agl_pcc'].mean():.3f})",
        "pca_ridge mean 0.250",
    ]  # NaN mean predictor PCC: no line
    # a second run as baseline -> scatter over the target genes
    other = make_adata(key="pgl", seed=1)
    adata.var["pgl_pcc"] = other.var["pgl_pcc"].to_numpy()
    ax = agl.pl.gene_performance(adata, baseline="pgl", show=False)
    assert len(np.concatenate([c.get_offsets() for c in ax.collections])) == N_TGT
    with pytest.raises(KeyError, match="Baseline 'nope'"):
        agl.pl.gene_performance(adata, baseline="nope", show=False)
    del adata.var["agl_pcc"]
    with pytest.raises(KeyError, match="evaluate"):
        agl.pl.gene_performance(adata, show=False)


# --- spatial_prediction -----------------------------------------------------------------------------------
_R_TITLE = re.compile(r"r = (-?[\d.]+) on (?:all (\d+) spots|(\d+) (held-out|validation|training|selected) spots)")


def _title_pcc(title: str) -> float:
    return float(_R_TITLE.search(title).group(1))


def _title_spots(title: str) -> tuple[int, str]:
    m = _R_TITLE.search(title)
    return (int(m.group(2)), "all") if m.group(2) else (int(m.group(3)), m.group(4))


def test_spatial_prediction_titles_match_pcc(adata, tmp_path):
    genes = ["T0", "A03"]
    axs = agl.pl.spatial_prediction(adata, genes, shared_scale=False, show=False, save=tmp_path / "sp.png")
    assert (tmp_path / "sp.png").stat().st_size > 1000
    assert axs.shape == (2, 2)
    for row, gene in enumerate(genes):
        j = adata.var_names.get_loc(gene)
        expected = np.corrcoef(np.log1p(adata.X[:, j]), adata.layers["agl_pred"][:, j])[0, 1]
        assert axs[row, 0].get_title() == f"{gene} observed"
        assert _title_pcc(axs[row, 1].get_title()) == pytest.approx(expected, abs=5e-4)
        assert _title_spots(axs[row, 1].get_title()) == (adata.n_obs, "all")  # no split: an unseen slide
        assert len(axs[row, 1].images) == 1  # H&E drawn
        # robust colour range: 1st-99th percentile of each panel's values
        pred = adata.layers["agl_pred"][:, j]
        assert axs[row, 1].collections[0].norm.vmax == pytest.approx(np.percentile(pred, 99), rel=1e-5)
        assert axs[row, 1].collections[0].norm.vmin == pytest.approx(np.percentile(pred, 1), rel=1e-5)
    j = adata.var_names.get_loc("T0")
    both = np.r_[np.log1p(adata.X[:, j]), adata.layers["agl_pred"][:, j]]
    axs = agl.pl.spatial_prediction(adata, "T0", robust=False, show=False)  # shared colour scale by default
    for a in axs[0]:
        assert (a.collections[0].norm.vmin, a.collections[0].norm.vmax) == pytest.approx((both.min(), both.max()))
    axs = agl.pl.spatial_prediction(adata, "T0", show=False)
    lo, hi = np.percentile(both, [1, 99])
    for a in axs[0]:
        assert (a.collections[0].norm.vmin, a.collections[0].norm.vmax) == pytest.approx((lo, hi), rel=1e-5)


def test_spatial_prediction_titles_give_the_held_out_r(adata):
    split = np.array(["train"] * adata.n_obs, dtype=object)
    held = np.random.default_rng(3).choice(adata.n_obs, 20, replace=False)
    split[held] = "unused"
    split[:5] = np.where(split[:5] == "unused", "unused", "val")
    adata.obs["agl_split"] = pd.Categorical(split)
    m = split == "unused"
    axs = agl.pl.spatial_prediction(adata, ["T0", "T1"], show=False)
    for row, gene in enumerate(["T0", "T1"]):
        j = adata.var_names.get_loc(gene)
        expected = np.corrcoef(np.log1p(adata.X[m, j]), adata.layers["agl_pred"][m, j])[0, 1]
        everywhere = np.corrcoef(np.log1p(adata.X[:, j]), adata.layers["agl_pred"][:, j])[0, 1]
        title = axs[row, 1].get_title()
        assert _title_pcc(title) == pytest.approx(expected, abs=5e-4) and abs(expected - everywhere) > 1e-3
        assert _title_spots(title) == (int(m.sum()), "held-out")
        # every spot is still drawn
        assert len(axs[row, 1].collections[0].get_paths()) == adata.n_obs
    given = np.zeros(adata.n_obs, dtype=bool)
    given[:30] = True
    title = agl.pl.spatial_prediction(adata, "T0", spots=given, show=False)[0, 1].get_title()
    j = adata.var_names.get_loc("T0")
    expected = np.corrcoef(np.log1p(adata.X[given, j]), adata.layers["agl_pred"][given, j])[0, 1]
    assert _title_pcc(title) == pytest.approx(expected, abs=5e-4) and _title_spots(title) == (30, "selected")
    adata.obs["agl_split"] = pd.Categorical(np.where(split == "unused", "train", split))  # no held-out spots
    title = agl.pl.spatial_prediction(adata, "T0", show=False)[0, 1].get_title()
    assert _title_spots(title) == (int((split == "val").sum()), "validation")


def test_spatial_prediction_scores_each_slide_on_its_own_spots():
    """A training slide beside a held-out one is scored on its validation spots, never "nan on 0 held-out spots".

    Regression (issue 20): the kind of spots was chosen over all slides, so a training section got 0 held-out
    spots and a NaN r, and an unseen slide read "on 178 all spots".
    """
    ad = make_adata(n_slides=2)
    n = ad.n_obs // 2
    split = np.array(["train"] * ad.n_obs, dtype=object)
    split[:12] = "val"  # slide0 trains and validates
    split[n:] = "unused"  # slide1 is held out
    ad.obs["agl_split"] = pd.Categorical(split)
    axs = agl.pl.spatial_prediction(ad, "T0", show=False)
    titles = [axs[r, 1].get_title() for r in range(2)]
    assert not any("nan" in t for t in titles)
    assert _title_spots(titles[0]) == (12, "validation") and "(slide0)" in titles[0]
    assert _title_spots(titles[1]) == (n, "held-out") and "(slide1)" in titles[1]
    j = ad.var_names.get_loc("T0")
    expected = np.corrcoef(np.log1p(ad.X[:12, j]), ad.layers["agl_pred"][:12, j])[0, 1]
    assert _title_pcc(titles[0]) == pytest.approx(expected, abs=5e-4)
    ad.uns["agl_pred"]["refit"] = True  # the model was retrained on its validation spots: the title says so
    assert "12 validation spots (refitted on)" in agl.pl.spatial_prediction(ad, "T0", show=False)[0, 1].get_title()
    ad.obs["agl_split"] = pd.Categorical(np.where(split == "val", "train", split))  # slide0: training spots only
    assert _title_spots(agl.pl.spatial_prediction(ad, "T0", show=False)[0, 1].get_title()) == (n, "training")
    del ad.obs["agl_split"]
    title = agl.pl.spatial_prediction(ad, "T0", library_id="slide1", show=False)[0, 1].get_title()
    assert f"on all {n} spots" in title and "all spots" not in title


def test_spatial_prediction_title_never_shows_nan():
    """An undefined r (constant prediction, no scored spots) is explained in words, not printed as nan."""
    from agl_scverse.pl._spatial_prediction import r_phrase

    ad = make_adata()
    ad.layers["agl_pred"][:, ad.var_names.get_loc("T1")] = 1.0
    title = agl.pl.spatial_prediction(ad, "T1", show=False)[0, 1].get_title()
    assert "nan" not in title and f"no r on all {ad.n_obs} spots: constant values" in title
    title = agl.pl.spatial_prediction(ad, "T0", spots=[0], show=False)[0, 1].get_title()
    assert "nan" not in title and "no r: only 1 selected spot" in title
    assert r_phrase(float("nan"), 0, "held-out") == "no r: no held-out spots"
    assert r_phrase(0.5, 1, "held-out") == "no r: only 1 held-out spot"
    assert r_phrase(0.25, 3, "validation") == "r = 0.250 on 3 validation spots"


def test_spatial_prediction_without_the_fit_record(adata, tmp_path):
    """A slide predicted with a loaded model has the layer, its mask and record, but no .uns["agl"]."""
    del adata.uns["agl"]
    fig = agl.pl.spatial_prediction(adata, "T2", show=False, return_fig=True)
    assert isinstance(fig, matplotlib.figure.Figure)
    title = [a.get_title() for a in fig.axes if "predicted" in a.get_title()][0]
    j = adata.var_names.get_loc("T2")
    expected = np.corrcoef(np.log1p(adata.X[:, j]), adata.layers["agl_pred"][:, j])[0, 1]
    assert _title_pcc(title) == pytest.approx(expected, abs=5e-4)
    del adata.uns["agl_pred"]  # a layer written before the record existed: defaults (counts in .X, log1p)
    axs = agl.pl.spatial_prediction(adata, "T2", show=False)
    assert _title_pcc(axs[0, 1].get_title()) == pytest.approx(expected, abs=5e-4)


def test_spatial_prediction_of_predictions_only(adata):
    """The AnnData of predict_anndata: .X is the predictions, so only the predicted panel is drawn."""
    k = Keys()
    pred = adata[:, adata.var[k.predicted].to_numpy()].copy()
    pred.X = pred.layers[k.pred_layer].copy()
    pred.uns = {"spatial": adata.uns["spatial"], k.pred_uns: {**adata.uns[k.pred_uns], "observed": False}}
    axs = agl.pl.spatial_prediction(pred, ["T0", "A01"], show=False)
    assert axs.shape == (2, 1)
    assert [a.get_title() for a in axs[:, 0]] == ["T0 predicted", "A01 predicted"]
    fig, given = plt.subplots(2, 1)
    out = agl.pl.spatial_prediction(pred, ["T0", "A01"], ax=given, show=False)
    assert list(out.ravel()) == list(given) and all(a.has_data() for a in given)
    with pytest.raises(ValueError, match="2 Axes"):
        agl.pl.spatial_prediction(pred, ["T0", "A01"], ax=plt.subplots(1, 3)[1], show=False)
    # forced observed panels on a slide with measured counts
    assert agl.pl.spatial_prediction(adata, "T0", observed=False, show=False).shape == (1, 1)


def test_spatial_prediction_crops_to_the_tissue(adata):
    """The synthetic image is 300 full-res px wide (60 px at 0.2); the spots cover 20..230 px."""
    xy = adata.obsm["spatial"] * 0.2
    margin = 10.0 * 0.2  # one spot diameter
    for a in agl.pl.spatial_prediction(adata, "T0", show=False)[0]:
        assert a.get_xlim() == pytest.approx((xy[:, 0].min() - margin, xy[:, 0].max() + margin))
        assert a.get_ylim() == pytest.approx((xy[:, 1].max() + margin, xy[:, 1].min() - margin))
    a = agl.pl.spatial_prediction(adata, "T0", crop=False, show=False)[0, 0]
    assert a.get_xlim()[1] - a.get_xlim()[0] > xy[:, 0].max() - xy[:, 0].min() + 2 * margin + 1


def test_spatial_prediction_of_a_loaded_model_h5ad(tmp_path):
    """End to end: fit, save, load, predict an H&E-only slide and a measured one, write, read back, plot."""
    import anndata as ad
    import torch
    from builders import FAST, small_slide

    torch.set_num_threads(1)
    train = small_slide()
    agl.tl.agl_fit(train, method="pgl", embedding_key="X_emb", n_targets=4, min_cells=1, **FAST).save(tmp_path / "m")
    model = agl.model.AGLModel.load(tmp_path / "m")
    measured = small_slide(seed=1)
    measured.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 40.0}}}  # no image: img=False
    he = measured[:, []].copy()
    agl.tl.predict_anndata(he, model).write_h5ad(tmp_path / "he.h5ad")
    agl.tl.agl_predict(measured, model)
    measured.write_h5ad(tmp_path / "measured.h5ad")
    gene = model.targets[0]
    he_back = ad.read_h5ad(tmp_path / "he.h5ad")
    assert he_back.uns["agl"]["source"] == "model"  # the model's run record (for the other plots), not a fit's
    del he_back.uns["agl"]  # spatial_prediction needs only the layer, its mask and its record
    axs = agl.pl.spatial_prediction(he_back, gene, img=False, show=False)
    assert axs.shape == (1, 1) and axs[0, 0].has_data()
    back = ad.read_h5ad(tmp_path / "measured.h5ad")
    assert back.uns["agl"]["source"] == "model"
    del back.uns["agl"]
    axs = agl.pl.spatial_prediction(back, gene, img=False, show=False)
    j = back.var_names.get_loc(gene)
    expected = np.corrcoef(np.log1p(back.X[:, [j]].toarray().ravel()), back.layers["agl_pred"][:, j])[0, 1]
    assert _title_pcc(axs[0, 1].get_title()) == pytest.approx(expected, abs=5e-4)


def test_spatial_prediction_several_slides(tmp_path):
    ad = make_adata(n_slides=2)
    no_col = ad.copy()
    del no_col.obs[LIBRARY_KEY]
    with pytest.raises(ValueError, match="library_key"):
        agl.pl.spatial_prediction(no_col, "T1", show=False)
    held = ad[ad.obs[LIBRARY_KEY] == "slide1"].copy()  # one slide kept, both images still in uns
    assert agl.pl.spatial_prediction(held, "T1", show=False).shape == (1, 2)
    axs = agl.pl.spatial_prediction(ad, ["T1"], show=False)  # default library_key "library_id"
    assert axs.shape == (2, 2)
    j = ad.var_names.get_loc("T1")
    for row, lib in enumerate(["slide0", "slide1"]):
        m = (ad.obs[LIBRARY_KEY] == lib).to_numpy()
        expected = np.corrcoef(np.log1p(ad.X[m, j]), ad.layers["agl_pred"][m, j])[0, 1]
        assert f"({lib})" in axs[row, 1].get_title()
        assert _title_pcc(axs[row, 1].get_title()) == pytest.approx(expected, abs=5e-4)
    axs = agl.pl.spatial_prediction(ad, "T1", library_key=LIBRARY_KEY, library_id="slide1", show=False)
    assert axs.shape == (1, 2)


def test_spatial_prediction_uses_the_run_transform_and_layer(adata):
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0  # the run trained on the layer: observed values must come from it
    adata.uns["agl_pred"].update(layer="counts", transform="log1p_cpm")  # as agl_predict records them
    j = adata.var_names.get_loc("T3")
    counts = adata.layers["counts"]
    cpm = np.log1p(counts[:, j] / counts.sum(axis=1) * 1e4)
    expected = np.corrcoef(cpm, adata.layers["agl_pred"][:, j])[0, 1]
    axs = agl.pl.spatial_prediction(adata, "T3", show=False)
    assert _title_pcc(axs[0, 1].get_title()) == pytest.approx(expected, abs=5e-4)
    # a layer in scanpy's scale is compared with the log1p CP10k of the counts
    adata.uns["agl_pred"].update(transform="log1p", scale="log1p_cp10k")
    axs = agl.pl.spatial_prediction(adata, "T3", show=False)
    assert _title_pcc(axs[0, 1].get_title()) == pytest.approx(expected, abs=5e-4)
    # without the layer's record (written before it existed), the fit's parameters say the same
    del adata.uns["agl_pred"]
    adata.uns["agl"]["params"].update(layer="counts", transform="log1p_cpm")
    axs = agl.pl.spatial_prediction(adata, "T3", show=False)
    assert _title_pcc(axs[0, 1].get_title()) == pytest.approx(expected, abs=5e-4)
    del adata.layers["counts"]
    with pytest.raises(KeyError, match="counts"):
        agl.pl.spatial_prediction(adata, "T3", show=False)


def test_spatial_prediction_errors(adata):
    with pytest.raises(ValueError, match="no predictions"):
        agl.pl.spatial_prediction(adata, ["X0"], show=False)  # excluded gene: not in .var["agl_predicted"]
    with pytest.raises(KeyError, match="not in adata.var_names"):
        agl.pl.spatial_prediction(adata, ["nope"], show=False)
    del adata.layers["agl_pred"]
    with pytest.raises(KeyError, match="agl_predict"):
        agl.pl.spatial_prediction(adata, ["T0"], show=False)
    with pytest.raises(TypeError, match="AnnData or a SpatialData"):
        agl.pl.spatial_prediction(np.zeros(3), ["T0"], show=False)


def test_spatial_prediction_spatialdata(tmp_path):
    pytest.importorskip("spatialdata_plot")
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel

    ad = make_adata()
    xy = ad.obsm["spatial"]
    shapes = ShapesModel.parse(gpd.GeoDataFrame({"radius": np.full(len(xy), 8.0)}, geometry=[Point(*p) for p in xy]))
    image = Image2DModel.parse(
        np.random.default_rng(0).integers(0, 255, (3, 270, 270)).astype(np.uint8), dims=("c", "y", "x")
    )
    ad.obs["region"] = pd.Categorical(["spots"] * ad.n_obs)
    ad.obs["instance"] = np.arange(ad.n_obs)
    del ad.uns["spatial"]
    table = TableModel.parse(ad, region="spots", region_key="region", instance_key="instance")
    sdata = SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table})
    axs = agl.pl.spatial_prediction(sdata, "T2", show=False, save=tmp_path / "sd.png")
    j = ad.var_names.get_loc("T2")
    expected = np.corrcoef(np.log1p(ad.X[:, j]), ad.layers["agl_pred"][:, j])[0, 1]
    assert _title_pcc(axs[0, 1].get_title()) == pytest.approx(expected, abs=5e-4)
    assert (tmp_path / "sd.png").exists()


# --- one family: the same plotting arguments and documented return shapes for every function ---------------
# name -> (call with the fixture's AnnData, shape of the returned axes array; None for a single Axes)
FAMILY = {
    "selected_genes": (lambda ad, **kw: agl.pl.selected_genes(ad, **kw), None),
    "selected_genes_history": (lambda ad, **kw: agl.pl.selected_genes(ad, show_history=True, **kw), (2,)),
    "training_history": (lambda ad, **kw: agl.pl.training_history(ad, **kw), (3,)),
    "gene_performance": (lambda ad, **kw: agl.pl.gene_performance(ad, **kw), None),
    "spatial_prediction": (lambda ad, **kw: agl.pl.spatial_prediction(ad, ["T0", "A03"], **kw), (2, 2)),
    "slide_prediction": (
        lambda ad, **kw: agl.pl.slide_prediction(ad, ["T0", "A03"], layer="agl_pred", measured=ad, **kw),
        (2, 2),
    ),
}
FUNCTIONS = [
    agl.pl.selected_genes,
    agl.pl.spatial_prediction,
    agl.pl.slide_prediction,
    agl.pl.training_history,
    agl.pl.gene_performance,
]


@pytest.fixture(params=list(FAMILY))
def plot(request):
    return FAMILY[request.param]


def _flat(axes) -> list:
    return [axes] if isinstance(axes, matplotlib.axes.Axes) else list(np.asarray(axes, dtype=object).ravel())


def test_pl_exports_the_five_functions():
    assert sorted(agl.pl.__all__) == sorted(f.__name__ for f in FUNCTIONS)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_family_signature_and_docs(fn):
    import inspect

    params = inspect.signature(fn).parameters
    expected = {"ax": None, "figsize": None, "show": None, "save": None, "return_fig": False}
    for name, default in expected.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default is default, name
    doc = fn.__doc__
    assert "%(" not in doc  # every docrep placeholder was filled
    for name in expected:
        assert f"\n{name}\n    " in doc, name  # documented at the level of the other parameters
    assert "Returns\n-------\n" in doc and "Examples\n--------\n" in doc


def test_family_return_fig(adata, plot):
    call, shape = plot
    fig = call(adata, show=False, return_fig=True)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) >= (1 if shape is None else int(np.prod(shape)))
    assert plt.get_fignums() == [fig.number]


def test_family_show_false_shape(adata, plot):
    call, shape = plot
    out = call(adata, show=False)
    if shape is None:
        assert isinstance(out, matplotlib.axes.Axes)
    else:
        assert isinstance(out, np.ndarray)
        assert out.shape == shape
        assert all(isinstance(a, matplotlib.axes.Axes) for a in out.ravel())
        assert len({id(a.figure) for a in out.ravel()}) == 1
    assert all(a.has_data() for a in _flat(out))


def test_family_shown_returns_none_and_autoshow(adata, plot):
    import scanpy as sc

    call, _ = plot
    assert call(adata, show=True) is None
    assert isinstance(call(adata, show=True, return_fig=True), matplotlib.figure.Figure)
    autoshow = sc.settings.autoshow
    try:  # show=None follows scanpy's setting
        sc.settings.autoshow = False
        assert call(adata) is not None  # not shown, so the axes come back
        sc.settings.autoshow = True
        assert call(adata) is None
    finally:
        sc.settings.autoshow = autoshow


def test_family_draws_into_given_axes(adata, plot):
    call, shape = plot
    fig, given = plt.subplots(*(shape or (1,)), squeeze=True)
    if shape is not None and len(shape) == 1:
        given = list(given)  # a plain sequence works as well as an array
    out = call(adata, ax=given, show=False)
    assert _flat(out) == _flat(given)
    assert all(a is b for a, b in zip(_flat(out), _flat(given)))
    assert all(a.has_data() for a in _flat(given))
    assert call(adata, ax=given, show=False, return_fig=True) is fig
    assert plt.get_fignums() == [fig.number]  # no other figure was made


def test_family_draws_into_axes_of_a_subfigure(adata, plot, tmp_path):
    """Axes of a SubFigure: the plot saves and returns the root Figure (a SubFigure cannot save itself)."""
    call, shape = plot
    root = plt.figure()
    sub = root.subfigures(1, 2)[1]
    given = sub.subplots(*(shape or (1,)), squeeze=True)
    assert call(adata, ax=given, show=False, return_fig=True) is root
    call(adata, ax=given, show=False, save=tmp_path / "sub.png")
    assert (tmp_path / "sub.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_family_save_without_suffix_writes_png(adata, plot, tmp_path):
    import scanpy as sc

    call, _ = plot
    fmt = sc.settings.file_format_figs
    try:
        sc.settings.file_format_figs = "png"  # a path without a suffix gets scanpy's figure format
        out = call(adata, show=False, save=tmp_path / "sub" / "x")
    finally:
        sc.settings.file_format_figs = fmt
    png = tmp_path / "sub" / "x.png"
    assert png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "sub" / "x").exists()
    assert out is not None


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_family_save_follows_scanpy(adata, fn, tmp_path):
    """save=True and save="_x.png" write into sc.settings.figdir under the plot's name, as scanpy's plots do.

    Regression (issue 20): save=True raised, and save="_x.png" wrote "_x.png" in the working folder.
    """
    import scanpy as sc

    call = FAMILY[fn.__name__][0]
    old = sc.settings.figdir, sc.settings.file_format_figs
    try:
        sc.settings.figdir, sc.settings.file_format_figs = tmp_path / "figs", "png"
        call(adata, show=False, save=True)
        assert (tmp_path / "figs" / f"{fn.__name__}.png").stat().st_size > 0
        call(adata, show=False, save="_x.pdf")
        assert (tmp_path / "figs" / f"{fn.__name__}_x.pdf").read_bytes()[:4] == b"%PDF"
        call(adata, show=False, save="_y")  # no known suffix: scanpy's format
        assert (tmp_path / "figs" / f"{fn.__name__}_y.png").exists()
        call(adata, show=False, save=str(tmp_path / "own" / "z.png"))  # a path with a folder: as given
        assert (tmp_path / "own" / "z.png").exists()
        n = len(list((tmp_path / "figs").iterdir()))
        call(adata, show=False, save=False)
        assert len(list((tmp_path / "figs").iterdir())) == n
    finally:
        sc.settings.figdir, sc.settings.file_format_figs = old


def test_spatial_prediction_wrong_number_of_axes(adata):
    _, axs = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="4 Axes"):
        agl.pl.spatial_prediction(adata, ["T0", "A03"], ax=axs, show=False)
    with pytest.raises(ValueError, match="2 Axes"):
        agl.pl.spatial_prediction(adata, "T0", ax=axs[0], show=False)
    _, grid = plt.subplots(1, 2)
    assert agl.pl.spatial_prediction(adata, "T0", ax=grid, show=False).shape == (1, 2)


def test_stored_nulls_read_as_absent(adata):
    """The stored null convention: an absent key, or the "None" / "" strings of older files, mean None."""
    params = adata.uns["agl"]["params"]
    del params["layer"]  # new convention: left out
    first = _title_pcc(agl.pl.spatial_prediction(adata, "T0", show=False)[0, 1].get_title())
    params["layer"] = ""
    assert _title_pcc(agl.pl.spatial_prediction(adata, "T0", show=False)[0, 1].get_title()) == first
    del adata.uns["agl"]["threshold"]
    ax = agl.pl.selected_genes(adata, show=False)
    assert not any(len(set(np.asarray(ln.get_xdata(), dtype=float))) == 1 for ln in ax.get_lines())
    adata.uns["agl"]["threshold"] = "None"
    ax = agl.pl.selected_genes(adata, show=False)
    assert not any(len(set(np.asarray(ln.get_xdata(), dtype=float))) == 1 for ln in ax.get_lines())
    adata.uns["agl"]["metrics"]["best_epoch"] = "None"  # falls back to the best validation PCC
    axs = agl.pl.training_history(adata, show=False)
    assert any("kept epoch 2: PCC 0.350" in t for t in _texts(axs[1]))
