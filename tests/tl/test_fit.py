"""agl_fit: what it writes, reproducibility, splits, methods, and clear errors that leave the AnnData unchanged."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from builders import FAST, assert_unchanged, fit_args, small_slide, snapshot

import agl_scverse as agl
from agl_scverse.model import AGLModel


def _fit(adata, **kw):
    args = {"embedding_key": "X_emb", "n_targets": 5, "min_cells": 1, **FAST, **kw}
    return agl.tl.agl_fit(adata, **fit_args(**args))


def test_fit_writes_the_contract_and_round_trips_h5ad(tmp_path):
    adata = small_slide()
    model = _fit(adata, method="dkgsb", epochs=3)
    assert isinstance(model, AGLModel) and model.method == "dkgsb"
    var = adata.var
    assert (var["agl_role"] == "target").sum() == 5
    assert set(var["agl_role"].astype(str)) == {"target", "auxiliary"}
    tg = var["agl_role"] == "target"
    assert np.all(var.loc[tg, "agl_weight"] == 1.0) and var.loc[tg, "agl_selected"].all()
    aux = var["agl_role"] == "auxiliary"
    w = var.loc[aux, "agl_weight"].to_numpy()
    r = var.loc[aux, "agl_prior_rank"].to_numpy()
    assert np.all(np.diff(w[np.argsort(r)]) <= 1e-12)  # the mask is monotone in the prior rank
    uns = adata.uns["agl"]
    assert uns["k"] == int(var.loc[aux, "agl_selected"].sum()) == model.k
    assert 0.0 <= uns["threshold"] <= 1.0
    assert set(uns["history"]) >= {"epoch", "train_loss", "val_pcc", "k", "theta"}
    assert len(uns["history"]["val_pcc"]) == 3
    assert uns["params"]["method"] == "dkgsb" and uns["params"]["seed"] == 0 and "torch" in uns["params"]["versions"]
    assert set(adata.obs["agl_split"].cat.categories) == {"train", "val", "unused"}
    assert (adata.obs["agl_split"] == "val").sum() == 24  # 20 % of 120
    assert np.isfinite(uns["metrics"]["val_pcc"])
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_allclose(back.uns["agl"]["history"]["theta"], uns["history"]["theta"])
    assert back.uns["agl"]["params"]["embedding_key"] == "X_emb"
    assert "targets" not in back.uns["agl"]["params"]  # the null convention: None is left out, never "None"
    assert (back.var["agl_selected"] == var["agl_selected"]).all()


def test_same_seed_same_selection_and_predictions():
    a, b = small_slide(), small_slide()
    ma = _fit(a, method="dkgsb", epochs=3, seed=7)
    mb = _fit(b, method="dkgsb", epochs=3, seed=7)
    np.testing.assert_array_equal(a.var["agl_weight"].to_numpy(), b.var["agl_weight"].to_numpy())
    assert (a.obs["agl_split"] == b.obs["agl_split"]).all()
    F = a.obsm["X_emb"]
    assert np.array_equal(ma.predict(F), mb.predict(F))
    c = small_slide()
    _fit(c, method="dkgsb", epochs=3, seed=8)
    assert not (a.obs["agl_split"] == c.obs["agl_split"]).all()


@pytest.mark.parametrize(
    ("method", "extra", "n_sel_aux"),
    [("pgl", {}, 0), ("agl", {}, 55), ("topk", {"k": 7}, 7)],
)
def test_methods_select_the_expected_auxiliaries(method, extra, n_sel_aux):
    adata = small_slide()
    model = _fit(adata, method=method, epochs=2, **extra)
    aux = adata.var["agl_role"] == "auxiliary"
    assert int(adata.var.loc[aux, "agl_selected"].sum()) == n_sel_aux == adata.uns["agl"]["k"]
    assert len(model.genes) == 5 + n_sel_aux
    if method == "topk":  # the first k by prior rank
        sel_ranks = adata.var.loc[aux & adata.var["agl_selected"], "agl_prior_rank"]
        assert sorted(sel_ranks) == list(range(7))


def test_split_by_group_and_key_added():
    out = small_slide()
    model = _fit(out, method="pgl", split_key="slide", val_groups=["B"], key_added="run1")
    assert isinstance(model, agl.model.AGLModel)  # one return shape: the model; results are written in place
    assert "agl" not in out.uns and "agl_role" not in out.var  # nothing under the default key
    split = out.obs["run1_split"].astype(str)
    assert (split[out.obs["slide"] == "B"] == "val").all() and (split[out.obs["slide"] == "A"] == "train").all()
    assert "run1" in out.uns and "run1_weight" in out.var
    assert out.uns["run1"]["params"]["val_groups"].tolist() == ["B"]


def test_spots_subset_marks_unused_and_save_dir(tmp_path):
    adata = small_slide()
    keep = np.arange(adata.n_obs) < 100
    model = _fit(adata, method="agl", spots=keep, save_dir=tmp_path / "m")
    assert (adata.obs["agl_split"].to_numpy()[~keep] == "unused").all()
    loaded = AGLModel.load(tmp_path / "m")
    assert np.array_equal(loaded.predict(adata.obsm["X_emb"]), model.predict(adata.obsm["X_emb"]))


def _nan_embedding(a):
    a.obsm["X_emb"][3, 2] = np.nan


def _zero_target(a):
    X = a.X.toarray()
    X[:, 0] = 0
    a.X = X


@pytest.mark.parametrize(
    ("prepare", "kwargs", "error", "match"),
    [
        (None, {"spots": np.zeros(120, bool)}, ValueError, "No spots left"),
        (None, {"n_targets": 500}, ValueError, "fewer than n_targets"),
        (None, {"targets": ["g1", "nope", "also_nope"]}, KeyError, "nope"),
        (_zero_target, {"targets": ["g0", "g1"]}, ValueError, "constant"),
        (_nan_embedding, {}, ValueError, "NaN"),
        (None, {"embedding_key": "X_missing"}, KeyError, "X_missing"),
        (None, {"method": "topk"}, ValueError, "needs k"),
        (None, {"method": "topk", "k": 10_000}, ValueError, "exceeds"),
        (None, {"method": "magic"}, ValueError, "Unknown method"),
        (None, {"split_key": "slide", "val_groups": ["C"]}, ValueError, "do not occur"),
        (None, {"val_fraction": 1.5}, ValueError, "val_fraction"),
        (None, {"lr": -1.0}, ValueError, "lr must be"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_adata_unchanged(prepare, kwargs, error, match):
    adata = small_slide()
    if prepare is not None:
        prepare(adata)
    snap = snapshot(adata)
    with pytest.raises(error, match=match):
        _fit(adata, **kwargs)
    assert_unchanged(adata, snap)


def test_existing_save_dir_is_refused_before_training(tmp_path):
    (tmp_path / "m").mkdir()
    adata = small_slide()
    snap = snapshot(adata)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _fit(adata, save_dir=tmp_path / "m")
    assert_unchanged(adata, snap)


def test_finetune_mode_trains_backbone_end_to_end_and_reloads(tmp_path):
    """Paper's network on a tiny slide: ResNet18 (random init, no download) + linear head, on 32 px patches."""
    slide = agl.datasets.synthetic_slide(
        n_rows=6, n_cols=6, n_tissue_genes=12, n_informative=10, n_noise=20, n_bursty_noise=2, seed=0
    )
    model = agl.tl.agl_fit(
        slide, method="dkgsb", mode="finetune", encoder=agl.EncoderConfig("resnet18", patch_px=32),
        genes=agl.GeneConfig(n_targets=4, min_cells=1), training=agl.TrainingConfig(epochs=2, batch_size=8, lr=1e-3),
        dkgsb=agl.DkGSBConfig(meta_batch_size=8), progress=False, save_dir=tmp_path / "ft",
    )  # fmt: skip
    assert model.mode == "finetune" and model.config["encoder"]["patch_px"] == 32
    hist = slide.uns["agl"]["history"]
    assert len(hist["epoch"]) == 2 and np.isfinite(hist["hypergrad"][1])
    backbone_params = [p for n, p in model.net.named_parameters() if n.startswith("backbone.")]
    assert backbone_params  # the encoder is part of the trained network
    out = agl.tl.agl_predict(slide, model, copy=True)
    loaded = AGLModel.load(tmp_path / "ft")
    out2 = agl.tl.agl_predict(slide, loaded, copy=True)
    np.testing.assert_array_equal(out.layers["agl_pred"], out2.layers["agl_pred"])
    tg = slide.var_names.isin(model.targets)
    assert np.isfinite(out.layers["agl_pred"][:, tg]).all()
