"""``agl_fit(head="hybrid")``: the MLP network(s) with the closed-form linear head's target predictions averaged in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import FAST, assert_unchanged, small_slide, snapshot

import agl_scverse as agl
from agl_scverse._expression import expression_transform
from agl_scverse._stats import pearson_per_gene
from agl_scverse.model import AGLModel, EmbeddingEnsemble, EmbeddingHead
from agl_scverse.tl._linear_head import choose_blend_weight


def _fit(adata, **kw):
    args = {"embedding_key": "X_emb", "n_targets": 5, "min_cells": 1, **FAST, "epochs": 3, "head": "hybrid", **kw}
    return agl.tl.agl_fit(adata, **args)


def _rows(adata, *names):
    split = adata.obs["agl_split"].astype(str).to_numpy()
    return np.flatnonzero(np.isin(split, names))


@pytest.mark.parametrize("refit", [False, True])
def test_targets_average_the_networks_and_the_ridge_and_auxiliaries_are_the_networks(refit):
    a = small_slide()
    model = _fit(a, method="agl", n_seeds=3, refit=refit)
    net, n_t = model.net, len(model.targets)
    assert isinstance(net, EmbeddingEnsemble) and model.n_members == 3 and net.linear.n_out == n_t
    X = np.asarray(a.obsm["X_emb"])
    mlp = np.mean([m.predict(X) for m in model.members()], 0)
    m = a.uns["agl"]["metrics"]
    # the linear head is the reduced-rank ridge of the targets and the first rrr_k auxiliaries, with the rank and
    # k of the best validation score, fitted on the spots the networks were (re)fitted on
    best = int(np.argmax(m["rrr_search"]["val_pcc"]))
    assert (m["rrr_search"]["k"][best], m["rrr_k"]) == (m["rrr_k"], m["rrr_k"]) and m["rrr_k"] > 0
    rows = _rows(a, "train", "val") if refit else _rows(a, "train")
    Y = expression_transform(a.X, "log1p", columns=a.var_names.get_indexer(model.genes[: n_t + m["rrr_k"]]))
    ridge = agl.tl.reduced_rank_ridge(
        X[rows].astype(float), Y[rows], X.astype(float), m["rrr_rank"], n_targets=n_t
    )  # fmt: skip
    lo, hi = Y[rows, :n_t].min(0), Y[rows, :n_t].max(0)
    w = m["hybrid_weight"]  # the linear head's share, chosen on validation (test below)
    assert net.linear_weight == w
    expected = (1 - w) * mlp[:, :n_t] + w * np.clip(ridge, lo, hi)
    pred = model.predict(X)
    np.testing.assert_allclose(pred[:, :n_t], expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(pred[:, n_t:], mlp[:, n_t:], rtol=1e-5, atol=1e-6)
    assert a.uns["agl"]["params"]["head"] == "hybrid"


def test_pgl_hybrid_uses_no_auxiliary_and_one_seed_works():
    a = small_slide()
    model = _fit(a, method="pgl", n_seeds=1)
    assert model.n_members == 1 and a.uns["agl"]["metrics"]["rrr_k"] == 0
    X = np.asarray(a.obsm["X_emb"])
    only_mlp = _fit(small_slide(), method="pgl", n_seeds=1, head="mlp")
    net = AGLModel(model.net.members[0], {**model.config, "net": model.net.members[0].config()})
    np.testing.assert_array_equal(net.predict(X), only_mlp.predict(X))  # the network is the head="mlp" fit
    lin = AGLModel(model.net.linear, {**model.config, "net": model.net.linear.config()})
    w = model.net.linear_weight
    np.testing.assert_allclose(model.predict(X), (1 - w) * only_mlp.predict(X) + w * lin.predict(X), atol=1e-6)
    assert w == 0.0 or not np.allclose(model.predict(X), only_mlp.predict(X))


def test_hybrid_round_trips_and_spread_is_the_networks(tmp_path):
    a = small_slide()
    model = _fit(a, method="dkgsb", n_seeds=2)
    X = np.asarray(a.obsm["X_emb"])
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    w = a.uns["agl"]["metrics"]["hybrid_weight"]
    assert cfg["net"]["linear"] == {"n_out": 5, "weight": w} and cfg["head"] == "hybrid"
    loaded = AGLModel.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    agl.tl.agl_predict(a, loaded)
    P = np.stack([mm.predict(X) for mm in loaded.members()])
    cols = a.var_names.get_indexer(loaded.genes)
    shown = a.var["agl_predicted"].to_numpy()[cols]  # DkGSB predicts its selected auxiliaries
    sd = a.layers["agl_pred_sd"][:, cols[shown]]
    np.testing.assert_allclose(sd, P.std(0, ddof=1)[:, shown], rtol=1e-4, atol=1e-5)
    # a config whose linear head has an impossible weight is refused on load
    cfg["net"]["linear"]["weight"] = 1.5
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="net.linear.weight"):
        AGLModel.load(tmp_path / "m")


def test_hybrid_errors_are_clear_and_change_nothing():
    a = small_slide()
    before = snapshot(a)
    with pytest.raises(ValueError, match="head='hybrid'.*mode='embedding'"):
        agl.tl.agl_fit(a, method="agl", mode="finetune", head="hybrid", n_targets=5, min_cells=1, progress=False)
    assert_unchanged(a, before)
    with pytest.raises(ValueError, match="linear head"):
        EmbeddingEnsemble([EmbeddingHead(4, 3, hidden=(5,))], EmbeddingHead(4, 2, hidden=(3,)))
    with pytest.raises(ValueError, match="linear_weight"):
        EmbeddingEnsemble([EmbeddingHead(4, 3, hidden=(5,))], EmbeddingHead(4, 2, hidden=()), linear_weight=1.5)
    with pytest.raises(ValueError, match="at least 2 members"):
        EmbeddingEnsemble([EmbeddingHead(4, 3, hidden=(5,))])


def test_blend_weight_is_chosen_on_validation_spots_only():
    # the share of the linear head maximises the validation mean target PCC of the blend of the first network
    # (trained on the training spots) and a ridge fitted on the training spots; the test spots play no part
    a = small_slide()
    model = _fit(a, method="agl", n_seeds=1, refit=False)
    m = a.uns["agl"]["metrics"]
    search = m["hybrid_weight_search"]
    assert list(search["weight"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert m["hybrid_weight"] == search["weight"][int(np.argmax(search["val_pcc"]))]
    n_t, X, val = len(model.targets), np.asarray(a.obsm["X_emb"]), _rows(a, "val")
    with torch.no_grad():
        x = torch.as_tensor(X[val], dtype=torch.float32)
        mlp = model.net.members[0].predict_expression(x)[:, :n_t].numpy()
        lin = model.net.linear.predict_expression(x).numpy()
    Y = expression_transform(a.X, "log1p", columns=a.var_names.get_indexer(model.targets))[val]
    for w, score in zip(search["weight"], search["val_pcc"]):
        blend = (1 - w) * mlp + w * lin
        assert score == pytest.approx(float(np.nanmean(pearson_per_gene(Y, blend))), abs=1e-4)
    # the choice follows the validation scores: a useless linear head gets w = 0, a useless network w = 1
    noise = np.random.default_rng(0).normal(size=Y.shape)
    assert choose_blend_weight(Y, Y, noise)[0] == 0.0 and choose_blend_weight(Y, noise, Y)[0] == 1.0
