"""The public configuration objects (agl_scverse.configs): checked values, per-mode defaults, dicts accepted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import agl_scverse as agl
from agl_scverse.configs import MODE_DEFAULTS, as_config


def test_configs_are_at_the_top_and_in_their_module():
    for name in ("GeneConfig", "NetworkConfig", "TrainingConfig", "DkGSBConfig", "EncoderConfig"):
        assert getattr(agl, name) is getattr(agl.configs, name)
        assert dataclasses.is_dataclass(getattr(agl, name))


def test_configs_are_frozen():
    cfg = agl.TrainingConfig(epochs=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 4


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"),
    [
        (agl.GeneConfig, {"n_targets": 0}, ValueError, "n_targets"),
        (agl.GeneConfig, {"transform": "log2"}, ValueError, "transform"),
        (agl.GeneConfig, {"targets": "ERBB2"}, TypeError, "list of gene names"),
        (agl.GeneConfig, {"min_cells": -1}, ValueError, "min_cells"),
        (agl.NetworkConfig, {"hidden": 16}, TypeError, r"hidden=\(256,\)"),
        (agl.NetworkConfig, {"hidden": (16, 0)}, ValueError, "positive integers"),
        (agl.NetworkConfig, {"dropout": 1.0}, ValueError, "dropout"),
        (agl.NetworkConfig, {"head": "linear"}, ValueError, "head"),
        (agl.TrainingConfig, {"epochs": 0}, ValueError, "epochs"),
        (agl.TrainingConfig, {"lr": -1.0}, ValueError, "lr"),
        (agl.TrainingConfig, {"loss": "l1"}, ValueError, "loss"),
        (agl.TrainingConfig, {"refit": "yes"}, TypeError, "refit"),
        (agl.TrainingConfig, {"batch_size": 1}, ValueError, "batch_size"),
        (agl.TrainingConfig, {"checkpoint_every": -1}, ValueError, "checkpoint_every"),
        (agl.DkGSBConfig, {"tau": 0}, ValueError, "tau"),
        (agl.DkGSBConfig, {"meta_normalizer": "normal"}, ValueError, "meta_normalizer"),
        (agl.DkGSBConfig, {"meta_scope": "head"}, ValueError, "meta_scope"),
        (agl.DkGSBConfig, {"k": -2}, ValueError, "k"),
        (agl.DkGSBConfig, {"k": 5, "k_grid": (0, 5)}, ValueError, "k='auto'"),
        (agl.DkGSBConfig, {"k": "auto", "k_grid": ()}, ValueError, "k_grid is empty"),
        (agl.DkGSBConfig, {"k": "auto", "k_grid": 5}, TypeError, "k_grid must list"),
        (agl.EncoderConfig, {"encoder": ""}, ValueError, "encoder"),
        (agl.EncoderConfig, {"patch_um": 0}, ValueError, "patch_um"),
        (agl.EncoderConfig, {"precision": "fp8"}, ValueError, "precision"),
        (agl.EncoderConfig, {"backend": "tensorrt"}, ValueError, "backend"),
        (agl.EncoderConfig, {"num_workers": -1}, ValueError, "num_workers"),
        (agl.EncoderConfig, {"allow_lowres": 1}, TypeError, "allow_lowres"),
    ],
)
def test_bad_values_are_refused_naming_the_field(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("mode", ["embedding", "finetune"])
def test_none_fields_take_the_mode_defaults(mode):
    d = MODE_DEFAULTS[mode]
    t = agl.TrainingConfig().resolved(mode)
    assert (t.epochs, t.patience, t.lr, t.batch_size, t.refit, t.augment, t.n_seeds) == (
        d["epochs"], d["patience"], d["lr"], d["batch_size"], d["refit"], d["augment"], d["n_seeds"]
    )  # fmt: skip
    assert agl.NetworkConfig().resolved(mode).hidden == d["hidden"]
    m = agl.DkGSBConfig().resolved(mode)
    assert (m.meta_steps, m.meta_scope, m.inner_steps, m.inner_lr) == (d["meta_steps"], d["meta_scope"], 1, 0.1)
    # given values win over the mode's
    assert agl.TrainingConfig(epochs=7, refit=False).resolved(mode).epochs == 7
    assert agl.TrainingConfig(epochs=7, refit=False).resolved(mode).refit is False
    assert agl.TrainingConfig().resolved(mode, head="rrr").n_seeds == 1


def test_values_are_normalised():
    assert agl.GeneConfig(targets=np.array(["A", "B"])).targets == ("A", "B")
    assert agl.NetworkConfig(hidden=[np.int64(8), 4]).hidden == (8, 4)
    assert agl.TrainingConfig(refit=np.bool_(True)).refit is True
    assert agl.DkGSBConfig(k="auto", k_grid=[np.int64(0), 3]).k_grid == (0, 3)


def test_as_config_takes_none_a_dict_or_the_class():
    t = agl.TrainingConfig(epochs=2)
    assert as_config(agl.TrainingConfig, t) is t
    assert as_config(agl.TrainingConfig, {"epochs": 2}) == t
    assert as_config(agl.TrainingConfig, None) == agl.TrainingConfig()
    with pytest.raises(TypeError, match=r"no field\(s\) \['epoch'\]"):
        as_config(agl.TrainingConfig, {"epoch": 2})
    with pytest.raises(TypeError, match="training must be a TrainingConfig"):
        as_config(agl.TrainingConfig, 5, "training")


def test_record_leaves_out_run_control():
    rec = agl.TrainingConfig(epochs=3, checkpoint_every=2, resume=True).record()
    assert rec["epochs"] == 3 and "checkpoint_every" not in rec and "resume" not in rec
