"""Leave-one-group-out cross-validation on a tiny synthetic dataset."""

from __future__ import annotations

from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import agl_scverse as agl
from agl_scverse.tl._cross_validate import CV_COLUMNS, cross_validate

N_TARGETS = 4


def _tiny(n_groups=3, per_group=40, n_genes=40, dim=12, seed=0):
    """Counts driven by a random embedding, so a linear probe has something to find."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    W = rng.normal(scale=0.6, size=(dim, n_genes))
    counts = rng.poisson(np.exp(0.5 + np.clip(emb @ W, -3, 3) * 0.7)).astype(np.float32)
    a = ad.AnnData(counts, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    a.obs_names = [f"s{i}" for i in range(n)]
    a.obs["slide"] = pd.Categorical(np.repeat([f"S{i}" for i in range(n_groups)], per_group))
    a.obsm["X_agl_toy"] = emb
    return a


TRAIN = agl.TrainingConfig(epochs=3, batch_size=32)
FIT = {"training": TRAIN, "network": agl.NetworkConfig(hidden=(8,)), "dkgsb": agl.DkGSBConfig(meta_batch_size=16)}
GENES = agl.GeneConfig(n_targets=N_TARGETS)


def test_cross_validate_shape_folds_and_summary():
    a = _tiny()
    before = a.copy()
    df = cross_validate(
        a, "slide", methods=("pgl", "topk"), genes=GENES, **FIT | {"dkgsb": {"meta_batch_size": 16, "k": 5}}
    )
    assert list(df.columns) == CV_COLUMNS
    assert len(df) == 3 * (2 + 3) * N_TARGETS  # folds x (methods + baselines) x targets
    assert sorted(df.fold.unique()) == ["S0", "S1", "S2"]
    assert set(df.method) == {"mean", "pca_ridge", "rrr", "pgl", "topk"}
    # within a fold every method is scored on the same targets
    for _, g in df.groupby("fold"):
        genes = {m: tuple(sorted(x.gene)) for m, x in g.groupby("method")}
        assert len(set(genes.values())) == 1
    # k: 0 for PGL, the requested k for top-k, NaN for baselines
    assert (df.loc[df.method == "pgl", "k"] == 0).all()
    assert (df.loc[df.method == "topk", "k"] == 5).all()
    assert df.loc[df.method.isin(["mean", "pca_ridge"]), "k"].isna().all()
    assert (df.fit_seconds >= 0).all()
    # the mean predictor is constant: correlation 0 by convention; ridge finds the linear signal
    assert (df.loc[df.method == "mean", "pearson"] == 0).all()
    assert df.loc[df.method == "pca_ridge", "pearson"].mean() > 0.3
    # input unchanged except the summary
    assert a.var.equals(before.var) and a.obs.equals(before.obs)
    np.testing.assert_array_equal(a.X, before.X)
    assert set(a.uns) == {"agl_cv"}
    u = a.uns["agl_cv"]
    assert len(u["summary"]["fold"]) == 3 * 5
    assert set(u["mean_pearson"]) == {"mean", "pca_ridge", "rrr", "pgl", "topk"}
    summ = pd.DataFrame(u["summary"])
    expect = df.groupby(["fold", "method"]).pearson.mean()
    got = summ.set_index(["fold", "method"]).mean_pearson
    np.testing.assert_allclose(got.loc[expect.index], expect)
    # h5ad-serialisable
    a.write_h5ad(pytest.importorskip("tempfile").mkdtemp() + "/cv.h5ad")


@pytest.mark.parametrize("refit", [False, True])
def test_baselines_train_on_the_same_spots_as_the_networks(refit):
    # without refit the networks never train on the validation group: neither do the baselines; with refit both do
    a = _tiny(n_groups=4, per_group=30)
    df = cross_validate(a, "slide", methods=("pgl",), genes=GENES, groups=["S0"],
                        **FIT | {"training": replace(TRAIN, refit=refit)})  # fmt: skip
    got = df[(df.method == "pca_ridge")].pearson.mean()
    slide = a.obs.slide.astype(str).to_numpy()
    test = np.flatnonzero(slide == "S0")
    train = np.flatnonzero(slide != "S0") if refit else np.flatnonzero(~np.isin(slide, ["S0", "S1"]))
    from agl_scverse.pp import expression_transform
    from agl_scverse.tl._baselines import pca_ridge

    roles = agl.pp.gene_roles(a, n_targets=N_TARGETS, train_mask=slide != "S0", inplace=False)
    Y = expression_transform(a.X, "log1p", columns=a.var_names.get_indexer(roles.targets))
    emb = a.obsm["X_agl_toy"]
    expect = pca_ridge(emb[train], Y[train], emb[test])
    r = [np.corrcoef(expect[:, j], Y[test, j])[0, 1] for j in range(N_TARGETS)]
    assert got == pytest.approx(float(np.nanmean(r)), abs=1e-5)


def test_method_labels_run_variants_with_their_settings():
    a = _tiny()
    df = cross_validate(
        a, "slide", methods=("pgl", "pgl:reg"), genes=GENES, groups=["S0"], baselines=False,
        method_kwargs={"pgl:reg": {"network": {"hidden": (8,), "dropout": 0.5},
                                   "training": replace(TRAIN, weight_decay=1e-3)}}, **FIT,
    )  # fmt: skip
    assert set(df.method) == {"pgl", "pgl:reg"}
    a_pgl = df[df.method == "pgl"].pearson.to_numpy()
    a_reg = df[df.method == "pgl:reg"].pearson.to_numpy()
    assert not np.allclose(a_pgl, a_reg)  # the variant's settings were used
    assert "'dropout': 0.5" in a.uns["agl_cv"]["params"]["method_kwargs"]["pgl:reg"]["network"]
    with pytest.raises(KeyError, match="method_kwargs"):
        cross_validate(a, "slide", methods=("pgl",), method_kwargs={"agl:x": {}}, **FIT)
    with pytest.raises(ValueError, match="duplicate"):
        cross_validate(a, "slide", methods=("pgl", "pgl"), **FIT)


def test_targets_are_hvg_of_training_groups_only():
    """A gene that varies only on the held-out group must not become a target of that fold."""
    a = _tiny(seed=1)
    rng = np.random.default_rng(5)
    held = (a.obs.slide == "S0").to_numpy()
    a.X[:, 7] = rng.poisson(3.0, a.n_obs)
    a.X[held, 7] = np.where(rng.random(held.sum()) < 0.75, 0, 12)  # wildly variable on S0 only
    df = cross_validate(a, "slide", methods=(), genes=GENES, groups=["S0"])
    assert "g7" not in set(df.gene)
    roles = agl.pp.gene_roles(a, n_targets=N_TARGETS, train_mask=~held, inplace=False)
    assert sorted(df.gene.unique()) == sorted(roles.targets)


def test_cross_validate_agl_dkgsb_two_groups():
    a = _tiny(n_groups=2, per_group=40)
    df = cross_validate(a, "slide", methods=("agl", "dkgsb"), genes=GENES, baselines=False, seed=1, **FIT)
    assert set(df.method) == {"agl", "dkgsb"} and len(df) == 2 * 2 * N_TARGETS
    assert (df.loc[df.method == "agl", "k"] == 40 - N_TARGETS).all()  # AGL-all: every auxiliary
    k = df.loc[df.method == "dkgsb", "k"].to_numpy()
    assert np.all((k >= 0) & (k <= 40 - N_TARGETS))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"group_key": "nope"}, KeyError, "nope"),
        ({"group_key": "one"}, ValueError, "at least 2"),
        ({"methods": ("magic",)}, ValueError, "Unknown method"),
        ({"embedding_key": "X_missing"}, KeyError, "X_missing"),
        ({"groups": ["S9"]}, KeyError, "S9"),
        ({"targets": ["g1"]}, TypeError, "sets 'targets'"),
        ({"genes": {"targets": ["g1"]}}, ValueError, "chooses the targets"),
    ],
)
def test_cross_validate_errors(kwargs, exc, match):
    a = _tiny(per_group=10)
    a.obs["one"] = "x"
    kw = {"group_key": "slide", "methods": ("pgl",)} | kwargs
    with pytest.raises(exc, match=match):
        cross_validate(a, **kw)
    assert "agl_cv" not in a.uns


def test_exposed_in_tl():
    assert agl.tl.cross_validate is cross_validate


def test_old_gene_keywords_warn_and_give_the_same_folds():
    a, b = _tiny(per_group=20), _tiny(per_group=20)
    new = cross_validate(a, "slide", methods=("pgl",), genes={"n_targets": 3, "min_cells": 2}, groups=["S0"], **FIT)
    with pytest.warns(FutureWarning, match=r"use genes=agl.GeneConfig\(n_targets=..., min_cells=...\)"):
        old = cross_validate(b, "slide", methods=("pgl",), n_targets=3, min_cells=2, groups=["S0"], **FIT)
    pd.testing.assert_frame_equal(new.drop(columns="fit_seconds"), old.drop(columns="fit_seconds"))


def test_a_methods_config_updates_the_shared_one_field_by_field():
    """A method's ``{"training": {"lr": ...}}`` keeps the shared TrainingConfig's epochs (it used to replace it)."""
    a, b = _tiny(per_group=20), _tiny(per_group=20)
    kw = {"genes": GENES, "groups": ["S0"], "baselines": False}
    net = agl.NetworkConfig(hidden=(8,), head="mlp")  # the networks alone: a linear head ignores lr
    shared = {**FIT, "network": net, "training": agl.TrainingConfig(epochs=3, batch_size=32, n_seeds=1)}
    df = cross_validate(
        a, "slide", methods=("pgl", "pgl:lr", "pgl:obj"), **kw, **shared,
        method_kwargs={"pgl:lr": {"training": {"lr": 0.02}}, "pgl:obj": {"training": agl.TrainingConfig(lr=0.02)}},
    )  # fmt: skip
    rec = a.uns["agl_cv"]["params"]["method_fit_kwargs"]
    for name in ("pgl:lr", "pgl:obj"):
        assert "epochs=3" in rec[name]["training"] and "lr=0.02" in rec[name]["training"], rec[name]
        assert "batch_size=32" in rec[name]["training"] and "hidden=(8,)" in rec[name]["network"]
    assert "lr=None" in rec["pgl"]["training"]
    direct = cross_validate(
        b, "slide", methods=("pgl",), **kw, **{**shared, "training": agl.TrainingConfig(epochs=3, batch_size=32,
                                                                                         n_seeds=1, lr=0.02)},
    )  # fmt: skip
    want = direct.pearson.to_numpy()
    np.testing.assert_allclose(df[df.method == "pgl:lr"].pearson.to_numpy(), want)
    np.testing.assert_allclose(df[df.method == "pgl:obj"].pearson.to_numpy(), want)
    assert not np.allclose(df[df.method == "pgl"].pearson.to_numpy(), want)
    with pytest.raises(TypeError, match="sets 'genes'"):
        cross_validate(a, "slide", methods=("pgl",), method_kwargs={"pgl": {"genes": {"prior": "hvg"}}}, **FIT)


def test_merge_configs_rule():
    from agl_scverse.tl._config import merge_configs

    shared = {"training": agl.TrainingConfig(epochs=3), "network": {"hidden": (8,)}, "device": "cpu", "encoder": "x"}
    out = merge_configs(shared, {"training": {"lr": 0.1}, "network": agl.NetworkConfig(dropout=0.5), "device": "cuda"})
    assert out["training"] == agl.TrainingConfig(epochs=3, lr=0.1)
    assert out["network"] == {"hidden": (8,), "dropout": 0.5}  # a dict where the shared one was a dict
    assert out["device"] == "cuda" and out["encoder"] == "x"
    assert merge_configs(shared, {"encoder": agl.EncoderConfig("densenet121")})["encoder"].encoder == "densenet121"
    assert merge_configs(shared, {"training": {"epochs": None}})["training"] == agl.TrainingConfig()  # back to default
    with pytest.raises(TypeError, match="no field"):
        merge_configs(shared, {"training": {"epoch": 4}})
    assert shared["training"] == agl.TrainingConfig(epochs=3)  # the shared arguments are not changed
