"""agl_fit options of the accuracy work: refit on train + validation, k="auto", the Adam look-ahead."""

from __future__ import annotations

import numpy as np
import pytest
from builders import FAST, assert_unchanged, fit_args, small_slide, snapshot

import agl_scverse as agl


def _fit(adata, **kw):
    args = {"embedding_key": "X_emb", "n_targets": 5, "min_cells": 1, **FAST, **kw}
    return agl.tl.agl_fit(adata, **fit_args(**args))


@pytest.mark.parametrize("method", ["agl", "dkgsb"])
def test_refit_trains_on_train_and_validation_for_the_selected_epochs(method):
    a, b = small_slide(), small_slide()
    m0 = _fit(a, method=method, epochs=4, refit=False)
    m1 = _fit(b, method=method, epochs=4, refit=True)
    ua, ub = a.uns["agl"], b.uns["agl"]
    # the selection phase is the same run: same validation metrics, best epoch and DkGSB mask
    assert ub["metrics"]["val_pcc"] == ua["metrics"]["val_pcc"]
    assert ub["metrics"]["best_epoch"] == ua["metrics"]["best_epoch"]
    np.testing.assert_array_equal(m1.weights, m0.weights)
    assert m1.k == m0.k
    # then a second network, trained for best_epoch + 1 epochs on every labelled spot
    assert ub["metrics"]["refit"] and not ua["metrics"]["refit"]
    assert len(ub["metrics"]["refit_train_loss"]) == ua["metrics"]["best_epoch"] + 1
    assert m1.config["refit"] is True
    X = np.asarray(a.obsm["X_emb"])
    assert not np.allclose(m1.predict(X), m0.predict(X))


def test_refit_is_reproducible():
    a, b = small_slide(), small_slide()
    p = [_fit(s, method="dkgsb", epochs=3, refit=True).predict(np.asarray(s.obsm["X_emb"])) for s in (a, b)]
    np.testing.assert_array_equal(p[0], p[1])


def test_k_auto_keeps_the_best_top_k_fit_on_validation():
    a = small_slide()
    model = _fit(a, method="topk", k="auto", k_grid=(0, 10, 40), epochs=3)
    ks = a.uns["agl"]["metrics"]["k_search"]
    np.testing.assert_array_equal(ks["k_grid"], [0, 10, 40])
    best = int(ks["k_grid"][int(np.argmax(ks["val_pcc"]))])
    assert model.k == best and model.method == "topk"
    assert a.uns["agl"]["metrics"]["val_pcc"] == pytest.approx(float(np.max(ks["val_pcc"])), abs=1e-6)
    # the kept model is exactly the top-k fit with that k
    b = small_slide()
    ref = _fit(b, method="topk", k=best, epochs=3)
    X = np.asarray(a.obsm["X_emb"])
    np.testing.assert_array_equal(model.predict(X), ref.predict(X))
    assert list(model.genes) == list(ref.genes)


def test_k_search_grid_defaults_and_caps():
    assert agl.tl.k_search_grid(0) == [0]
    g = agl.tl.k_search_grid(1000)
    assert g[0] == 0 and g[-1] == 250 and len(g) == 6 and g == sorted(g)
    assert agl.tl.k_search_grid(50, grid=(0, 20, 500)) == [0, 20, 50]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "topk", "k": "best"}, (TypeError, ValueError), "k"),
        ({"method": "topk", "k": 5, "k_grid": (0, 5)}, ValueError, "k_grid applies"),
        ({"method": "topk", "k": "auto", "k_grid": ()}, ValueError, "k_grid is empty"),
        ({"method": "topk", "k": "auto", "k_grid": (0, -3)}, ValueError, "k_grid"),
        ({"method": "agl", "refit": "yes"}, TypeError, "refit"),
        ({"method": "dkgsb", "lookahead": "lbfgs"}, ValueError, "lookahead"),
    ],
)
def test_bad_options_are_clear_errors_and_leave_adata_unchanged(kwargs, error, match):
    adata = small_slide()
    snap = snapshot(adata)
    with pytest.raises(error, match=match):
        _fit(adata, **kwargs)
    assert_unchanged(adata, snap)


@pytest.mark.parametrize("lookahead", ["adam", "sgd", "authors"])
def test_dkgsb_lookaheads_are_reproducible_and_move_theta(lookahead):
    a, b = small_slide(), small_slide()
    kw = {"method": "dkgsb", "epochs": 4, "lookahead": lookahead, "meta_steps": 8, "beta": 0.05}
    _fit(a, **kw)
    _fit(b, **kw)
    ta, tb = a.uns["agl"]["history"]["theta"], b.uns["agl"]["history"]["theta"]
    np.testing.assert_array_equal(ta, tb)
    assert np.ptp(ta) > 0.01  # theta moved
    assert a.uns["agl"]["params"]["lookahead"] == lookahead
    # inner_steps / inner_lr left at None take the look-ahead's own (the authors': 12 fresh-Adam steps at 3e-5)
    p = a.uns["agl"]["params"]
    assert (p["inner_steps"], p["inner_lr"]) == ((12, 3e-5) if lookahead == "authors" else (1, 0.1))


def test_meta_scope_auto_is_all_in_embedding_mode_and_recorded(tmp_path):
    kw = {"method": "dkgsb", "epochs": 3, "meta_steps": 8, "beta": 0.05}
    a = small_slide()
    model = _fit(a, save_dir=tmp_path / "m", **kw)
    assert a.uns["agl"]["params"]["meta_scope"] == "all"  # the resolved value, not "auto"
    assert model.config["hyperparameters"]["meta_scope"] == "all"
    # one hidden layer: its last block is the whole trunk, so "last" is the same look-ahead (the same run) ...
    b = small_slide()
    _fit(b, meta_scope="last", **kw)
    assert b.uns["agl"]["params"]["meta_scope"] == "last"
    np.testing.assert_array_equal(b.uns["agl"]["history"]["theta"], a.uns["agl"]["history"]["theta"])
    # ... two hidden layers: "last" holds the first one constant, a different look-ahead
    c, d = small_slide(), small_slide()
    _fit(c, hidden=(16, 8), **kw)
    _fit(d, hidden=(16, 8), meta_scope="last", **kw)
    assert c.uns["agl"]["history"]["hypergrad"][1] != d.uns["agl"]["history"]["hypergrad"][1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"meta_scope": "head"}, ValueError, "Unknown meta_scope 'head'"),
        ({"meta_scope": ["out.weight"]}, ValueError, "Unknown meta_scope"),
        ({"meta_scope": "last", "hidden": ()}, ValueError, "only the output layer"),
    ],
)
def test_bad_meta_scopes_are_clear_errors_and_leave_adata_unchanged(kwargs, error, match):
    adata = small_slide()
    snap = snapshot(adata)
    with pytest.raises(error, match=match):
        _fit(adata, method="dkgsb", **kwargs)
    assert_unchanged(adata, snap)


def test_finetune_dkgsb_meta_scope_last_runs_end_to_end_and_is_a_different_look_ahead():
    from fit_runs import fit

    a, _ = fit("finetune", epochs=2)
    b, _ = fit("finetune", epochs=2, meta_scope="last")
    assert a.uns["agl"]["params"]["meta_scope"] == "all" and b.uns["agl"]["params"]["meta_scope"] == "last"
    ha, hb = a.uns["agl"]["history"], b.uns["agl"]["history"]
    assert np.isfinite(ha["hypergrad"][1]) and np.isfinite(hb["hypergrad"][1])
    assert ha["hypergrad"][1] != hb["hypergrad"][1]  # the look-ahead moved other parameters
    c, _ = fit("finetune", epochs=2, meta_scope="all")
    np.testing.assert_array_equal(c.uns["agl"]["history"]["hypergrad"], ha["hypergrad"])  # "auto" is "all"


def test_defaults_refit_and_five_seeds_in_embedding_mode_only():
    # embedding mode refits and averages five seeds; the linear head is one fit; fine-tune mode trains one encoder
    a = small_slide()
    model = _fit(a, method="pgl", epochs=2)
    p = a.uns["agl"]["params"]
    assert (p["refit"], p["n_seeds"], model.n_members, model.config["refit"]) == (True, 5, 5, True)
    _fit(a, method="pgl", head="rrr")
    assert (a.uns["agl"]["params"]["refit"], a.uns["agl"]["params"]["n_seeds"]) == (True, 1)
    from agl_scverse.tl._config import FitConfig

    cfg = FitConfig.build("pgl", "finetune")
    assert (cfg.training.refit, cfg.training.n_seeds) == (False, 1)
