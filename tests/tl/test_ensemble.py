"""Seed ensembles: ``agl_fit(n_seeds=...)``, their save/load, and the spread layer of ``agl_predict``."""

from __future__ import annotations

import numpy as np
import pytest
from builders import FAST, assert_unchanged, small_slide, snapshot

import agl_scverse as agl
from agl_scverse.model import AGLModel, EmbeddingEnsemble


def _fit(adata, **kw):
    args = {"embedding_key": "X_emb", "n_targets": 5, "min_cells": 1, **FAST, "epochs": 3, **kw}
    return agl.tl.agl_fit(adata, **args)


@pytest.mark.parametrize("refit", [False, True])
def test_members_are_the_single_fits_of_successive_seeds(refit):
    a = small_slide()
    ens = _fit(a, method="agl", n_seeds=3, refit=refit, head="mlp")  # the networks alone (no linear head)
    assert isinstance(ens.net, EmbeddingEnsemble) and ens.n_members == 3
    X = np.asarray(a.obsm["X_emb"])
    members = [m.predict(X) for m in ens.members()]
    np.testing.assert_allclose(ens.predict(X), np.mean(members, 0), rtol=1e-6, atol=1e-6)
    # member 0 is the network of seed 0 (same split), member 2 that of seed 2 on the same split
    single = _fit(small_slide(), method="agl", refit=refit, n_seeds=1, head="mlp")
    np.testing.assert_array_equal(members[0], single.predict(X))
    assert not np.allclose(members[0], members[2])
    assert a.uns["agl"]["params"]["n_seeds"] == 3


def test_dkgsb_members_share_the_first_networks_mask():
    a = small_slide()
    ens = _fit(a, method="dkgsb", n_seeds=2)
    single = _fit(small_slide(), method="dkgsb", n_seeds=1)
    np.testing.assert_array_equal(ens.weights, single.weights)
    assert ens.k == single.k
    # validation metrics are those of the first network
    assert ens.config["val_pcc"] == single.config["val_pcc"]


def test_ensemble_is_reproducible_and_round_trips(tmp_path):
    a, b = small_slide(), small_slide()
    X = np.asarray(a.obsm["X_emb"])
    m1, m2 = _fit(a, method="agl", n_seeds=2), _fit(b, method="agl", n_seeds=2)
    np.testing.assert_array_equal(m1.predict(X), m2.predict(X))
    m1.save(tmp_path / "m")
    loaded = AGLModel.load(tmp_path / "m")
    assert loaded.n_members == 2 and loaded.config["net"]["kind"] == "ensemble"
    np.testing.assert_array_equal(loaded.predict(X), m1.predict(X))


def test_spread_layer_is_the_members_sd_and_zero_elsewhere():
    a = small_slide()
    ens = _fit(a, method="agl", n_seeds=3)
    agl.tl.agl_predict(a, ens)
    sd, pred = a.layers["agl_pred_sd"], a.var["agl_predicted"].to_numpy()
    assert sd.dtype == np.float32 and np.all(sd[:, ~pred] == 0) and np.all(sd[:, pred] >= 0) and sd[:, pred].max() > 0
    X = np.asarray(a.obsm["X_emb"])
    P = np.stack([m.predict(X) for m in ens.members()])
    cols = a.var_names.get_indexer(ens.genes)
    np.testing.assert_allclose(sd[:, cols], P.std(0, ddof=1), rtol=1e-4, atol=1e-5)
    # the chunked (dask) route gives the same layers
    b = small_slide()
    agl.tl.agl_predict(b, ens, max_dense_bytes=100)
    np.testing.assert_allclose(np.asarray(b.layers["agl_pred_sd"]), sd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(b.layers["agl_pred"]), a.layers["agl_pred"], rtol=1e-6, atol=1e-6)
    # predict_anndata carries it too, and spread=False leaves it out
    out = agl.tl.predict_anndata(a, ens)
    assert out.layers["agl_pred_sd"].shape == out.shape
    c = small_slide()
    agl.tl.agl_predict(c, ens, spread=False)
    assert "agl_pred_sd" not in c.layers


def test_bad_ensemble_options_are_clear_errors():
    a = small_slide()
    with pytest.raises(ValueError, match="n_seeds"):
        _fit(a, method="agl", n_seeds=0)
    with pytest.raises(ValueError, match="n_seeds=2 applies to mode='embedding'"):
        agl.tl.agl_fit(a, method="agl", mode="finetune", n_seeds=2, n_targets=5, min_cells=1)
    single = _fit(a, method="agl", n_seeds=1)
    before = snapshot(a)
    with pytest.raises(ValueError, match="spread=True needs a seed ensemble"):
        agl.tl.agl_predict(a, single, spread=True)
    assert_unchanged(a, before)
    with pytest.raises(ValueError, match="same shape"):
        EmbeddingEnsemble([agl.model.EmbeddingHead(4, 3, hidden=(5,)), agl.model.EmbeddingHead(4, 3, hidden=(6,))])
