"""agl_predict: the prediction layer, H&E-only slides, and checks that refuse mismatched data unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import FAST, assert_unchanged, small_slide, snapshot

import agl_scverse as agl


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    adata = small_slide()
    model = agl.tl.agl_fit(adata, method="topk", k=4, embedding_key="X_emb", n_targets=5, min_cells=1, **FAST)
    return adata, model


def test_predict_writes_layer_with_nan_for_other_genes(fitted):
    train, model = fitted
    new = small_slide(seed=1)
    assert agl.tl.agl_predict(new, model) is None
    P = new.layers["agl_pred"]
    assert P.shape == new.shape and P.dtype == np.float32
    pred_cols = new.var_names.isin(model.predicted_genes)
    assert pred_cols.sum() == 9
    assert np.isfinite(P[:, pred_cols]).all() and np.isnan(P[:, ~pred_cols]).all()
    direct = model.predict(new.obsm["X_emb"])
    idx = [model.genes.index(g) for g in new.var_names[pred_cols]]
    np.testing.assert_array_equal(P[:, pred_cols], direct[:, idx])
    out = agl.tl.agl_predict(new, model, key_added="run2", copy=True)
    assert "run2_pred" in out.layers and "run2_pred" not in new.layers


def test_predict_from_saved_directory_is_identical(fitted, tmp_path):
    _, model = fitted
    model.save(tmp_path / "m")
    a, b = small_slide(seed=2), small_slide(seed=2)
    agl.tl.agl_predict(a, model)
    agl.tl.agl_predict(b, tmp_path / "m")
    np.testing.assert_array_equal(a.layers["agl_pred"], b.layers["agl_pred"])


def test_he_only_slide_gets_a_new_anndata_from_predict_anndata(fitted):
    _, model = fitted
    full = small_slide(seed=3)
    he = full[:, []].copy()
    he.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 10.0}}}
    snap = snapshot(he)
    with pytest.raises(ValueError, match="predict_anndata"):  # agl_predict writes a layer: it needs the genes
        agl.tl.agl_predict(he, model)
    assert_unchanged(he, snap)
    out = agl.tl.predict_anndata(he, model)
    assert out is not he and he.n_vars == 0 and "agl_pred" not in he.layers
    assert list(out.var_names) == model.predicted_genes
    assert (out.var["agl_role"].astype(str)[:5] == "target").all()
    np.testing.assert_array_equal(out.obsm["spatial"], full.obsm["spatial"])
    assert "spatial" in out.uns and (out.obs_names == full.obs_names).all()
    np.testing.assert_array_equal(out.X, out.layers["agl_pred"])
    idx = [model.genes.index(g) for g in out.var_names]
    np.testing.assert_array_equal(out.X, model.predict(full.obsm["X_emb"])[:, idx])
    lazy = agl.tl.predict_anndata(he, model, max_dense_bytes=0)  # a chunked dask .X (and layer), same numbers
    assert not isinstance(lazy.X, np.ndarray)
    np.testing.assert_array_equal(np.asarray(lazy.X), out.X)
    np.testing.assert_array_equal(np.asarray(lazy.layers["agl_pred"]), out.X)


def _drop_target(a, model):
    keep = ~a.var_names.isin(model.targets[:2])
    return a[:, keep].copy()


def _other_encoder(a, model):
    a.uns["agl_embeddings"] = {"X_emb": {"encoder": "densenet121", "patch_px": 224, "patch_um": 112.0}}
    return a


def _model_records_resnet(model):
    model.config["encoder"] = {
        "encoder": "resnet18",
        "recorded": True,
        "weights_sha256": "",
        "patch_px": 224,
        "patch_um": 112.0,
    }


def _wide(a, model):
    a.obsm["X_emb"] = np.hstack([a.obsm["X_emb"], a.obsm["X_emb"]])
    return a


def _nan(a, model):
    a.obsm["X_emb"][0, 0] = np.nan
    return a


def _no_embedding(a, model):
    del a.obsm["X_emb"]
    return a


@pytest.mark.parametrize(
    ("prepare", "error", "match"),
    [
        (_drop_target, KeyError, "target gene"),
        (_other_encoder, ValueError, "encoder: data 'densenet121' vs model 'resnet18'"),
        (_wide, ValueError, "expects 12 features"),
        (_nan, ValueError, "NaN"),
        (_no_embedding, KeyError, "records no encoder"),
    ],
)
def test_mismatches_are_clear_errors_and_leave_adata_unchanged(fitted, prepare, error, match):
    import copy

    _, model = fitted
    model = copy.deepcopy(model)
    if prepare is _other_encoder:
        _model_records_resnet(model)
    a = prepare(small_slide(seed=4), model)
    snap = snapshot(a)
    with pytest.raises(error, match=match):
        agl.tl.agl_predict(a, model)
    assert_unchanged(a, snap)


def test_missing_weights_file_is_a_clear_error(fitted, tmp_path):
    import copy

    _, model = fitted
    model = copy.deepcopy(model)
    model.config["encoder"] = {
        "encoder": "resnet18", "recorded": True, "weights_sha256": "ab" * 32,
        "weights_path": str(tmp_path / "gone.pth"), "patch_px": 32, "patch_um": 112.0,
    }  # fmt: skip
    a = _no_embedding(small_slide(seed=5), model)
    snap = snapshot(a)
    with pytest.raises(FileNotFoundError, match="Pass weights="):
        agl.tl.agl_predict(a, model)  # the recorded path is never opened
    with pytest.raises(FileNotFoundError, match="is not a file"):
        agl.tl.agl_predict(a, model, weights=tmp_path / "gone.pth")
    assert_unchanged(a, snap)


def test_missing_embeddings_are_computed_with_the_model_settings():
    """agl_fit embeds a slide without features; agl_predict re-embeds a new slide with the recorded settings."""
    kw = {"n_tissue_genes": 10, "n_informative": 10, "n_noise": 20, "n_bursty_noise": 2}
    train = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=0, **kw)
    model = agl.tl.agl_fit(
        train, method="agl", encoder="resnet18", patch_px=32, n_targets=3, min_cells=1, **{**FAST, "epochs": 1}
    )
    assert "X_agl_resnet18" in train.obsm
    rec = train.uns["agl_embeddings"]["X_agl_resnet18"]
    assert rec["patch_px"] == 32 and model.config["encoder"]["patch_px"] == 32
    new = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=1, **kw)
    agl.tl.agl_predict(new, model)
    assert new.uns["agl_embeddings"]["X_agl_resnet18"]["patch_px"] == 32
    tg = new.var_names.isin(model.targets)
    assert np.isfinite(new.layers["agl_pred"][:, tg]).all()
    # the same slide embedded at another patch size is refused
    other = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=1, **kw)
    agl.pp.embed_patches(other, encoder="resnet18", patch_px=48)
    snap = snapshot(other)
    with pytest.raises(ValueError, match="patch_px: data 48 vs model 32"):
        agl.tl.agl_predict(other, model)
    assert_unchanged(other, snap)
