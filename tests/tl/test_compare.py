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
