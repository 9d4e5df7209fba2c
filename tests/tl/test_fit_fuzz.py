"""``agl_fit`` argument combinations, valid and invalid, drawn by hypothesis on a tiny slide with an embedding.

Each call either returns a model and writes ``.uns[key_added]``, or raises ValueError / KeyError / TypeError with
a message and the AnnData as it was (``builders.snapshot`` / ``assert_unchanged``). Arguments that once gave raw
errors (device, seed, n_targets, hidden, min_cells) are in :func:`test_argument_errors_name_the_argument`.
"""

from __future__ import annotations

import numpy as np
import pytest
from builders import FAST, assert_unchanged, small_slide, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agl_scverse import tl
from agl_scverse.model import AGLModel

CLEAR = (ValueError, KeyError, TypeError)
N, N_GENES = 80, 30
NAN, INF = float("nan"), float("inf")

# Each parameter: values that must work and values that must be refused (a mix is drawn per example).
VALUES = {
    "method": ["pgl", "agl", "topk", "dkgsb", "magic", None, 3],
    "k": [None, 0, 1, 5, 20, 21, 1000, -1, 2.5, "3", True],
    "n_targets": [1, 5, 10, 29, 30, 31, 0, -1, "5"],
    "epochs": [1, 2, 0, -1, 1.5, "2"],
    "batch_size": [1, 2, 16, 1000, 0, -3, 1.5],
    "lr": [1e-3, 0.5, 0.0, -1.0, NAN, INF, "0.1"],
    "val_fraction": [0.2, 0.5, 0.01, 0.99, 0.0, 1.0, -0.1, 1.5, NAN, None],
    "dropout": [0.0, 0.5, 0.99, 1.0, -0.1, NAN, None],
    "hidden": [(16,), (), (8, 4), [16], None, (0,), (-2,), ("a",), (2.5,)],
    "transform": ["log1p", "log1p_cpm", "none", "sqrt", None],
    "prior": ["hvg", "coexpression", "moran", "score", "text", "nope", None, 5],
    "patience": [1, 3, 0, -1],
    "min_cells": [0, 1, 0.5, 1.0, 80, 1000, -1, 1.5],
    "loss": ["pearson", "mse", "l1"],
    "tau": [0.01, 1.0, 0.0, -1.0, NAN],
    "meta_steps": [0, 1, -1],
    "meta_batch_size": [1, 32, 0],
    "meta_normalizer": ["detached", "soft", "x"],
    "inner_steps": [1, 2, 0, -1],
    "weight_decay": [0.0, 1e-4, -1.0, NAN],
    "key_added": ["agl", "run2", "", None, 3],
    "spots": ["all", "half", "indices", "names", "one", "none", "wrong length"],
    "split": [None, ("slide", ["A"]), ("slide", ["Z"]), ("slide", ["A", "B"]), ("nope", ["A"])],
    "embedding_key": ["X_emb", "X_nan", "missing"],
    "layer": [None, "counts", "nope"],
}


def _slide():
    adata = small_slide(n=N, n_genes=N_GENES, d=6)
    adata.var["score"] = np.linspace(0.0, 1.0, N_GENES)
    adata.var["text"] = "a"
    adata.obsm["X_nan"] = adata.obsm["X_emb"].copy()
    adata.obsm["X_nan"][3, 0] = np.nan
    adata.layers["counts"] = adata.X.copy()
    return adata


BASE = _slide()


def _spots(name: str):
    return {
        "all": None,
        "half": np.arange(N) < N // 2,
        "indices": np.arange(0, N, 2),
        "names": [f"s{i}" for i in range(50)],
        "one": np.arange(N) < 1,
        "none": np.zeros(N, dtype=bool),
        "wrong length": np.ones(5, dtype=bool),
    }[name]


def _kwargs(drawn: dict) -> dict:
    kwargs = {**FAST, "n_targets": 10, "device": "cpu", "embedding_key": "X_emb"}
    for name, value in drawn.items():
        if name == "spots":
            kwargs["spots"] = _spots(value)
        elif name == "split":
            if value is not None:
                kwargs["split_key"], kwargs["val_groups"] = value
        elif name == "embedding_key":
            kwargs["embedding_key"] = value
        else:
            kwargs[name] = value
    return kwargs


def check_fit(kwargs: dict) -> str:
    """Fit a copy of :data:`BASE`; return "ok" or "clear", fail on anything else."""
    adata = BASE.copy()
    snap = snapshot(adata)
    try:
        model = tl.agl_fit(adata, **kwargs)
    except CLEAR as e:
        assert str(e).strip(), f"{type(e).__name__} without a message for {kwargs}"
        assert_unchanged(adata, snap)
        return "clear"
    assert isinstance(model, AGLModel)
    assert kwargs.get("key_added", "agl") in adata.uns
    return "ok"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=st.dictionaries(st.sampled_from(sorted(VALUES)), st.none(), min_size=1, max_size=4), data=st.data())
def test_agl_fit_argument_fuzz(drawn, data):
    drawn = {name: data.draw(st.sampled_from(VALUES[name]), label=name) for name in drawn}
    check_fit(_kwargs(drawn))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"method": "topk", "k": 5}, "ok"),
        ({"method": "topk"}, "clear"),
        ({"method": "topk", "k": 21}, "clear"),  # more than the 20 auxiliaries
        ({"method": "pgl", "n_targets": 30}, "ok"),
        ({"method": "dkgsb", "n_targets": 30}, "clear"),  # no auxiliary left
        ({"val_fraction": 0.99}, "clear"),
        ({"embedding_key": "X_nan"}, "clear"),
        ({"embedding_key": "missing"}, "clear"),
        ({"prior": "text"}, "clear"),
        ({"spots": np.zeros(N, dtype=bool)}, "clear"),
        ({"split_key": "slide", "val_groups": ["A", "B"]}, "clear"),
        ({"targets": ["g0", "nope"]}, "clear"),
        ({"targets": ["g0"], "auxiliaries": ["g0"]}, "clear"),
    ],
    ids=repr,
)
def test_agl_fit_table(kwargs, expected):
    assert check_fit({**FAST, "n_targets": 10, "device": "cpu", "embedding_key": "X_emb", **kwargs}) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        # once raw or unclear errors (a type outside the clear ones, or a message that names no argument)
        pytest.param({"device": "tpu"}, id="device=tpu"),
        pytest.param({"device": "meta"}, id="meta"),
        pytest.param({"seed": None}, id="seed=None"),
        pytest.param({"seed": 1.5}, id="seed=1.5"),
        pytest.param({"seed": -1}, id="seed=-1"),
        pytest.param({"n_targets": None}, id="n_targets=None"),
        pytest.param({"hidden": 16}, id="hidden=16"),
        pytest.param({"min_cells": NAN}, id="min_cells=nan"),
    ],
)
def test_argument_errors_name_the_argument(kwargs):
    """Each must raise a clear error naming its argument (ValueError / TypeError whose message names it)."""
    name = next(iter(kwargs))
    adata = BASE.copy()
    with pytest.raises((ValueError, TypeError)) as exc:
        tl.agl_fit(adata, **{**FAST, "n_targets": 10, "embedding_key": "X_emb", "device": "cpu", **kwargs})
    if name in ("seed", "n_targets", "hidden", "min_cells") and name not in str(exc.value):
        raise exc.value  # unclear: the message does not name the argument


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"n_targets": 2.5}, id="n_targets=2.5"),
        pytest.param({"n_targets": True}, id="n_targets=True"),
    ],
)
def test_non_integer_n_targets_is_refused(kwargs):
    with pytest.raises(CLEAR):
        tl.agl_fit(BASE.copy(), **{**FAST, "n_targets": 10, "embedding_key": "X_emb", "device": "cpu", **kwargs})


def test_numpy_integer_seed_is_accepted():
    """A NumPy integer is a valid seed (e.g. one drawn from a Generator)."""
    tl.agl_fit(BASE.copy(), **{**FAST, "n_targets": 10, "embedding_key": "X_emb", "device": "cpu", "seed": np.int64(3)})
