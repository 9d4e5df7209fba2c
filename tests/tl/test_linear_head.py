"""``agl_fit(head="rrr")``: the closed-form reduced-rank ridge head as an AGL model."""

from __future__ import annotations

import numpy as np
import pytest
from builders import assert_unchanged, small_slide, snapshot

import agl_scverse as agl
from agl_scverse._expression import expression_transform
from agl_scverse.model import AGLModel


def _fit(adata, **kw):
    args = {"embedding_key": "X_emb", "n_targets": 5, "min_cells": 1, "progress": False, "head": "rrr", **kw}
    return agl.tl.agl_fit(adata, **args)


def _train_val(adata, key="agl"):
    split = adata.obs[f"{key}_split"].astype(str).to_numpy()
    return np.flatnonzero(split == "train"), np.flatnonzero(split == "val")


def test_head_is_the_reduced_rank_ridge_with_the_validation_rank():
    a = small_slide()
    model = _fit(a, method="agl", refit=False)
    m = a.uns["agl"]["metrics"]
    search = m["rrr_search"]
    best = int(np.argmax(search["val_pcc"]))
    assert m["rrr_rank"] == min(
        search["rank"][best] if search["rank"][best] > 0 else len(model.genes), len(model.genes)
    )
    assert m["val_pcc"] == pytest.approx(float(search["val_pcc"][best]), abs=1e-4)
    tr, _ = _train_val(a)
    X = np.asarray(a.obsm["X_emb"], dtype=np.float64)
    Y = expression_transform(a.X, "log1p", columns=a.var_names.get_indexer(model.genes))
    ref = agl.tl.reduced_rank_ridge(X[tr], Y[tr], X, m["rrr_rank"], n_targets=len(model.targets))
    np.testing.assert_allclose(model.predict(X)[:, : len(model.targets)], ref, rtol=1e-3, atol=1e-3)
    # auxiliary outputs are predicted too, inside each gene's training range
    aux = model.predict(X)[:, len(model.targets) :]
    assert aux.shape[1] == model.k > 0 and np.all(aux >= Y[tr, len(model.targets) :].min(0) - 1e-5)


def test_refit_uses_every_labelled_spot_and_round_trips(tmp_path):
    a, b = small_slide(), small_slide()
    m0, m1 = _fit(a, method="pgl", refit=False), _fit(b, method="pgl", refit=True)
    assert a.uns["agl"]["metrics"]["rrr_rank"] == b.uns["agl"]["metrics"]["rrr_rank"]
    X = np.asarray(a.obsm["X_emb"])
    assert not np.allclose(m0.predict(X), m1.predict(X))
    tr, va = _train_val(b)
    both = np.sort(np.concatenate([tr, va]))
    Y = expression_transform(b.X, "log1p", columns=b.var_names.get_indexer(m1.genes))
    rank = b.uns["agl"]["metrics"]["rrr_rank"]
    ref = agl.tl.reduced_rank_ridge(X[both].astype(float), Y[both], X.astype(float), rank, n_targets=len(m1.targets))
    np.testing.assert_allclose(m1.predict(X), ref, rtol=1e-3, atol=1e-3)
    m1.save(tmp_path / "m")
    loaded = AGLModel.load(tmp_path / "m")
    assert loaded.config["head"] == "rrr"
    np.testing.assert_array_equal(loaded.predict(X), m1.predict(X))


def test_k_auto_searches_the_number_of_auxiliaries():
    a = small_slide()
    model = _fit(a, method="topk", k="auto", k_grid=(0, 10, 40))
    s = a.uns["agl"]["metrics"]["rrr_search"]
    assert sorted(set(s["k"].tolist())) == [0, 10, 40]
    assert model.k == int(s["k"][int(np.argmax(s["val_pcc"]))])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "dkgsb"}, "method='dkgsb'"),
        ({"method": "agl", "n_seeds": 2}, "n_seeds=2"),
        ({"method": "agl", "mode": "finetune", "embedding_key": None}, "mode='finetune'"),
        ({"method": "agl", "head": "linear"}, "head"),
    ],
)
def test_rrr_head_refuses_what_it_cannot_do(kwargs, match):
    a = small_slide()
    before = snapshot(a)
    with pytest.raises(ValueError, match=match):
        _fit(a, **kwargs)
    assert_unchanged(a, before)


def test_training_history_says_why_a_linear_head_has_none():
    import matplotlib

    matplotlib.use("Agg")
    a = small_slide()
    _fit(a, method="agl")
    with pytest.raises(ValueError, match="head='rrr'.*no training history"):
        agl.pl.training_history(a, show=False)
