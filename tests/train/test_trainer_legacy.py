"""train_network's flat keywords of release 0.2.0: accepted for one release, warning with the config spelling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import agl_scverse as agl
from agl_scverse._legacy_keywords import TRAIN_NETWORK_KEYWORDS, TRAIN_NETWORK_RENAMED, merge_legacy
from agl_scverse.model import EmbeddingHead, GeneMask, train_network
from agl_scverse.train._mask import normalized_ranks
from agl_scverse.train._trainer import TensorInputs

#: every 0.2.0 keyword with a value away from today's default, and the config field it must reach
OLD = {
    "epochs": 3, "patience": 2, "lr": 5e-3, "weight_decay": 1e-3, "batch_size": 16, "loss": "mse", "augment": False,
    "inner_steps": 2, "inner_lr": 1e-3, "meta_steps": 2, "meta_batch_size": 16, "beta": 0.05,
    "normalizer": "detached", "lookahead": "sgd", "meta_scope": "last",
}  # fmt: skip
FIELD = {
    "training": ("epochs", "patience", "lr", "weight_decay", "batch_size", "loss", "augment"),
    "dkgsb": ("inner_steps", "inner_lr", "meta_steps", "meta_batch_size", "beta", "meta_normalizer", "lookahead",
              "meta_scope"),
}  # fmt: skip
CONFIG = {"training": agl.TrainingConfig, "dkgsb": agl.DkGSBConfig}


def _new_spelling() -> dict:
    """OLD as configs: the field names, each in its config."""
    as_fields = {TRAIN_NETWORK_RENAMED.get(n, n): v for n, v in OLD.items()}
    return {param: cls(**{f: as_fields[f] for f in FIELD[param]}) for param, cls in CONFIG.items()}


def _train(**kwargs):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 6)).astype(np.float32)
    Y = (np.tanh(X @ rng.normal(size=(6, 3))) @ rng.normal(size=(3, 10)) + rng.normal(size=(90, 10))).astype(np.float32)
    torch.manual_seed(0)
    net = EmbeddingHead(6, 10, hidden=(8,))
    mask = GeneMask(normalized_ranks(np.arange(8)), tau=0.01)  # DkGSB: the bi-level keywords take effect
    res = train_network(
        net, TensorInputs(X), Y, np.arange(60), np.arange(60, 90), 2, mask=mask, seed=1, progress=False, **kwargs
    )
    return net, res


def test_the_table_holds_exactly_the_0_2_0_keywords():
    assert set(TRAIN_NETWORK_KEYWORDS) == set(OLD)
    for name, (param, cls) in TRAIN_NETWORK_KEYWORDS.items():
        assert cls is CONFIG[param] and TRAIN_NETWORK_RENAMED.get(name, name) in FIELD[param], name


@pytest.mark.parametrize("name", sorted(OLD))
def test_each_old_keyword_reaches_its_config_field_and_warns_the_new_spelling(name):
    param, cls = TRAIN_NETWORK_KEYWORDS[name]
    field = TRAIN_NETWORK_RENAMED.get(name, name)
    with pytest.warns(FutureWarning) as rec:
        out = merge_legacy(
            "train_network", {"training": None, "dkgsb": None}, {name: OLD[name]}, 2, TRAIN_NETWORK_KEYWORDS,
            TRAIN_NETWORK_RENAMED,
        )  # fmt: skip
    assert out[param] == {field: OLD[name]}
    assert out[({"training", "dkgsb"} - {param}).pop()] is None
    msg = str(rec[0].message)
    assert msg.startswith(f"train_network({name}=) is deprecated")
    assert f"use {param}=agl.{cls.__name__}({field}=...)" in msg
    # into a given config object: replaced there, the other fields kept
    with pytest.warns(FutureWarning):
        given = {"training": agl.TrainingConfig(n_seeds=3), "dkgsb": agl.DkGSBConfig(tau=0.2)}
        out = merge_legacy("train_network", given, {name: OLD[name]}, 2, TRAIN_NETWORK_KEYWORDS, TRAIN_NETWORK_RENAMED)
    assert getattr(out[param], field) == OLD[name]
    assert out["training"].n_seeds == 3 and out["dkgsb"].tau == 0.2


def test_old_keywords_give_the_result_of_the_config_spelling():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config spelling warns about nothing
        net_new, new = _train(**_new_spelling())
    with pytest.warns(FutureWarning) as rec:
        net_old, old = _train(**OLD)
    assert len(rec) == 1 and rec[0].filename == __file__  # points at the caller
    msg = str(rec[0].message)
    assert "training=agl.TrainingConfig(epochs=..., patience=..., lr=..., weight_decay=..., batch_size=..." in msg
    assert "dkgsb=agl.DkGSBConfig(inner_steps=..., " in msg and "meta_normalizer=..., lookahead=..." in msg
    for key in new.history.keys() - {"seconds"}:
        np.testing.assert_array_equal(new.history[key], old.history[key], err_msg=key)  # NaN equals NaN here
    for key, value in net_new.state_dict().items():
        assert torch.equal(value, net_old.state_dict()[key]), key
    assert new.theta == old.theta and new.k == old.k
    # and the keywords took effect: today's defaults train otherwise
    _, default = _train(training={"epochs": 3})
    assert default.history["train_loss"] != new.history["train_loss"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 3, "training": {"epochs": 4}}, r"epochs is given twice, as epochs= and in training=; give it in"),
        ({"lr": 1e-2, "training": agl.TrainingConfig(lr=1e-3)}, "lr is given twice"),
        ({"normalizer": "soft", "dkgsb": {"meta_normalizer": "soft"}}, r"in dkgsb= only \(as meta_normalizer\)"),
        ({"beta": 0.1, "dkgsb": agl.DkGSBConfig(beta=0.2)}, "beta is given twice"),
        ({"epoch": 3}, "unexpected keyword argument 'epoch'"),
        ({"meta_normalizer": "soft"}, "unexpected keyword argument 'meta_normalizer'"),  # agl_fit's, not 0.2.0's
        ({"tau": 0.1}, "unexpected keyword argument 'tau'"),
        ({"n_seeds": 2}, "unexpected keyword argument 'n_seeds'"),
    ],
)
def test_twice_or_unknown_is_a_type_error_naming_it(kwargs, match):
    with pytest.raises(TypeError, match=match):
        _train(**kwargs)
