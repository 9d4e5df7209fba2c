"""compare_methods: several methods on one split, with the run's own keys (regression: key_added="run1")."""

from __future__ import annotations

import numpy as np
from builders import FAST, assert_unchanged, small_slide, snapshot

import agl_scverse as agl


def test_compare_methods_with_key_added_uses_the_runs_keys():
    """compare_methods(..., key_added="run1") raised KeyError: 'agl_role' (fixed names read instead of Keys)."""
    a = small_slide()
    snap = snapshot(a)
    df = agl.tl.compare_methods(
        a, ("pgl", "agl"), embedding_key="X_emb", key_added="run1", truth_key=None, n_targets=5, min_cells=1, **FAST
    )
    assert_unchanged(a, snap)  # the input is not modified
    assert list(df["method"]) == ["pgl", "agl"]
    assert df.loc[df.method == "pgl", "k"].item() == 0 and df.loc[df.method == "agl", "k"].item() > 0
    assert np.isfinite(df["test_pcc"]).all() and np.isfinite(df["ridge_pcc"]).all()


def test_a_methods_genes_update_the_shared_ones_field_by_field():
    """A method's ``{"genes": {"prior": ...}}`` keeps the shared GeneConfig's n_targets (it used to replace it)."""
    a = small_slide()
    fit = {
        "embedding_key": "X_emb", "truth_key": None, "network": agl.NetworkConfig(hidden=(16,)),
        "training": agl.TrainingConfig(epochs=4, batch_size=32, n_seeds=1), "dkgsb": agl.DkGSBConfig(k=5),
    }  # fmt: skip
    merged = agl.tl.compare_methods(
        a, ("topk:co",), genes=agl.GeneConfig(n_targets=5, min_cells=1), **fit,
        method_kwargs={"topk:co": {"genes": {"prior": "coexpression"}}},
    )  # fmt: skip
    direct = agl.tl.compare_methods(
        a, ("topk",), genes=agl.GeneConfig(n_targets=5, min_cells=1, prior="coexpression"), **fit
    )
    cols = ["test_pcc", "val_pcc", "k", "n_auxiliary"]
    np.testing.assert_allclose(merged[cols].to_numpy(float), direct[cols].to_numpy(float))
