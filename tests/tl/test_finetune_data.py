"""Fine-tune mode's data path: augment and precision recorded in the model, workers, precision at predict time."""

from __future__ import annotations

import json

import numpy as np
import pytest
from builders import FAST, small_slide

import agl_scverse as agl
from agl_scverse.model import AGLModel, register_encoder


def _tiny_cnn():
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())  # fmt: skip


register_encoder("test_tiny_cnn", _tiny_cnn, overwrite=True)


def _tiny_slide():
    return agl.datasets.synthetic_slide(
        n_rows=6, n_cols=6, n_tissue_genes=12, n_informative=10, n_noise=20, n_bursty_noise=2, seed=0
    )


def _finetune(slide, **kw):
    args = {"method": "agl", "mode": "finetune", "encoder": "test_tiny_cnn", "patch_px": 32, "n_targets": 4,
            "min_cells": 1, "epochs": 2, "batch_size": 8, "lr": 1e-3, "progress": False}  # fmt: skip
    return agl.tl.agl_fit(slide, **{**args, **kw})


@pytest.mark.slow  # two short fine-tune runs (one with DataLoader workers), ~12 s on 2 shared cores
def test_finetune_records_augment_and_precision_and_reloads_bf16(tmp_path):
    slide = _tiny_slide()
    model = _finetune(slide, save_dir=tmp_path / "aug")
    assert model.config["augment"] is True and model.config["hyperparameters"]["augment"] is True  # on by default
    assert model.config["precision"]["precision_requested"] == "auto"
    assert slide.uns["agl"]["params"]["augment"] is True and slide.uns["agl"]["params"]["precision"] == "auto"
    plain = _finetune(slide.copy(), augment=False, precision="bf16", num_workers=2, prefetch_factor=1,
                      save_dir=tmp_path / "bf16")  # fmt: skip
    assert plain.config["augment"] is False
    assert plain.config["precision"] == {"precision": "bf16", "channels_last": True, "precision_requested": "bf16"}
    loaded = AGLModel.load(tmp_path / "bf16")  # channels_last weights were saved as plain tensors
    a = agl.tl.agl_predict(slide, loaded, copy=True, precision="fp32").layers["agl_pred"]
    b = agl.tl.agl_predict(slide, loaded, copy=True, precision="auto", num_workers=2).layers["agl_pred"]
    tg = slide.var_names.isin(loaded.targets)
    assert np.isfinite(a[:, tg]).all()
    np.testing.assert_allclose(b[:, tg], a[:, tg], rtol=0, atol=2e-2 * np.nanstd(a[:, tg]))


def test_augment_is_refused_in_embedding_mode_and_old_models_default_to_off(tmp_path):
    adata = small_slide()
    with pytest.raises(ValueError, match="augment=True applies to mode='finetune'"):
        agl.tl.agl_fit(adata, embedding_key="X_emb", n_targets=5, min_cells=1, augment=True, **FAST)
    with pytest.raises(ValueError, match="Unknown precision"):
        agl.tl.agl_fit(adata, embedding_key="X_emb", n_targets=5, min_cells=1, precision="fp64", **FAST)
    model = agl.tl.agl_fit(adata, embedding_key="X_emb", n_targets=5, min_cells=1, save_dir=tmp_path / "m", **FAST)
    assert model.config["augment"] is False and model.config["precision"] is None
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["augment"], cfg["precision"], cfg["digest"]  # a model saved before these fields existed (format 3)
    cfg["format_version"] = 3
    cfg_path.write_text(json.dumps(cfg))
    assert AGLModel.load(tmp_path / "m").config["augment"] is False
    cfg["precision"] = {"precision": "fp8"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="precision.precision"):
        AGLModel.load(tmp_path / "m")
