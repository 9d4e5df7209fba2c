"""agl_fit's configs: at most 20 parameters, dicts accepted, old flat keywords deprecated but giving the same model."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
from builders import assert_unchanged, small_slide, snapshot

import agl_scverse as agl

NEW = {
    "genes": agl.GeneConfig(n_targets=5, min_cells=1),
    "network": agl.NetworkConfig(hidden=(16,)),
    "training": agl.TrainingConfig(epochs=3, patience=10, batch_size=32, n_seeds=2),
    "dkgsb": agl.DkGSBConfig(meta_batch_size=32, tau=0.05),
}
OLD = {
    "n_targets": 5, "min_cells": 1, "hidden": (16,), "epochs": 3, "patience": 10, "batch_size": 32, "n_seeds": 2,
    "meta_batch_size": 32, "tau": 0.05,
}  # fmt: skip


def test_agl_fit_has_at_most_20_parameters():
    params = [
        p for p in inspect.signature(agl.tl.agl_fit).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    assert len(params) <= 20, [p.name for p in params]
    for name in ("genes", "network", "training", "dkgsb", "encoder"):
        assert name in inspect.signature(agl.tl.agl_fit).parameters


def test_old_keywords_warn_naming_the_new_spelling_and_give_the_same_model():
    a, b = small_slide(), small_slide()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        new = agl.tl.agl_fit(a, method="dkgsb", embedding_key="X_emb", seed=3, progress=False, **NEW)
    with pytest.warns(FutureWarning) as rec:
        old = agl.tl.agl_fit(b, method="dkgsb", embedding_key="X_emb", seed=3, progress=False, **OLD)
    msg = str(rec[0].message)
    assert len(rec) == 1 and "deprecated" in msg
    for spelling in (
        "genes=agl.GeneConfig(n_targets=..., min_cells=...)",
        "network=agl.NetworkConfig(hidden=...)",
        "training=agl.TrainingConfig(epochs=..., patience=..., batch_size=..., n_seeds=...)",
        "dkgsb=agl.DkGSBConfig(meta_batch_size=..., tau=...)",
    ):
        assert spelling in msg
    F = a.obsm["X_emb"]
    assert np.array_equal(new.predict(F), old.predict(F))
    np.testing.assert_array_equal(a.var["agl_weight"].to_numpy(), b.var["agl_weight"].to_numpy())
    assert a.uns["agl"]["params"] == b.uns["agl"]["params"]


def test_dicts_work_as_configs_and_an_encoder_name_is_the_old_spelling():
    a, b = small_slide(), small_slide()
    agl.tl.agl_fit(a, method="pgl", embedding_key="X_emb", progress=False, **NEW)
    dicts = {"genes": {"n_targets": 5, "min_cells": 1}, "network": {"hidden": [16]}}
    dicts["training"] = {"epochs": 3, "patience": 10, "batch_size": 32, "n_seeds": 2}
    dicts["dkgsb"] = {"meta_batch_size": 32, "tau": 0.05}
    with pytest.warns(FutureWarning, match=r"use encoder=agl.EncoderConfig\('resnet18'\)"):
        agl.tl.agl_fit(b, method="pgl", embedding_key="X_emb", progress=False, encoder="resnet18", **dicts)
    for col in ("agl_role", "agl_weight"):
        assert (a.var[col] == b.var[col]).all()
    assert a.uns["agl"]["params"] == b.uns["agl"]["params"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epoch": 3}, TypeError, "unexpected keyword argument 'epoch'"),
        ({"epochs": 3, "training": {"epochs": 4}}, TypeError, "epochs is given twice"),
        ({"tau": 0.1, "dkgsb": agl.DkGSBConfig(tau=0.2)}, TypeError, "tau is given twice"),
        ({"training": {"epoch": 3}}, TypeError, r"TrainingConfig has no field\(s\) \['epoch'\]"),
        ({"training": 3}, TypeError, "training must be a TrainingConfig"),
        ({"training": {"augment": True}}, ValueError, "augment=True applies to mode='finetune'"),
        ({"method": "topk"}, ValueError, r"dkgsb=agl.DkGSBConfig\(k=500\)"),
    ],
)
def test_bad_configs_are_clear_errors_and_leave_adata_unchanged(kwargs, error, match):
    adata = small_slide()
    snap = snapshot(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(error, match=match):
            agl.tl.agl_fit(adata, embedding_key="X_emb", progress=False, **kwargs)
    assert_unchanged(adata, snap)


def test_old_keyword_merges_into_a_given_config():
    a, b = small_slide(), small_slide()
    agl.tl.agl_fit(a, method="pgl", embedding_key="X_emb", progress=False, **NEW)
    new = dict(NEW, training=agl.TrainingConfig(patience=10, batch_size=32, n_seeds=2))
    with pytest.warns(FutureWarning, match=r"training=agl.TrainingConfig\(epochs=...\)"):
        agl.tl.agl_fit(b, method="pgl", embedding_key="X_emb", progress=False, epochs=3, **new)
    assert a.uns["agl"]["params"] == b.uns["agl"]["params"]
