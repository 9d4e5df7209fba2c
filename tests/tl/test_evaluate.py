"""evaluate: per-gene metrics in .var, the summary with baselines in .uns, which spots are scored."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from builders import FAST, small_slide

import agl_scverse as agl


def test_evaluate_held_out_spots_with_baselines(tmp_path):
    adata = small_slide(n=160)
    held = np.arange(adata.n_obs) >= 120
    model = agl.tl.agl_fit(
        adata, method="agl", embedding_key="X_emb", n_targets=5, min_cells=1, spots=~held, **{**FAST, "epochs": 40}
    )
    agl.tl.evaluate(adata, model)  # predicts first (no layer yet)
    assert "agl_pred" in adata.layers
    tg = adata.var_names.isin(model.targets)
    # the layer comes with its mask and record, as agl_predict writes them
    np.testing.assert_array_equal(adata.var["agl_predicted"], adata.var_names.isin(model.predicted_genes))
    assert adata.uns["agl_pred"]["scale"] == "model"
    assert np.isfinite(adata.var.loc[tg, "agl_pcc"]).all() and adata.var.loc[~tg, "agl_pcc"].isna().all()
    test = adata.uns["agl"]["metrics"]["test"]
    assert test["n_spots"] == 40 and test["spots"].startswith("unused")
    assert set(test) >= {"model", "mean_predictor", "pca_ridge"}
    assert test["mean_predictor"]["pearson"] == 0.0  # a constant prediction, by the metrics convention
    assert test["model"]["pearson"] > 0.15  # the latent drives the counts; the model must find it
    # the model's number equals the per-gene metrics recomputed by hand
    Y = agl.pp.expression_transform(adata.X[held], "log1p", columns=np.flatnonzero(tg))
    P = adata.layers["agl_pred"][held][:, tg]
    r = [np.corrcoef(Y[:, j], P[:, j])[0, 1] for j in range(5)]
    assert test["model"]["pearson"] == pytest.approx(np.mean(r), abs=1e-5)
    assert "val_pcc" in adata.uns["agl"]["metrics"]  # the fit's validation metrics are kept
    adata.write_h5ad(tmp_path / "e.h5ad")
    back = ad.read_h5ad(tmp_path / "e.h5ad")
    assert back.uns["agl"]["metrics"]["test"]["pca_ridge"]["pearson"] == pytest.approx(test["pca_ridge"]["pearson"])


def test_evaluate_unseen_slide_scores_all_spots_without_baselines():
    train = small_slide()
    model = agl.tl.agl_fit(train, method="pgl", embedding_key="X_emb", n_targets=5, min_cells=1, **FAST)
    new = small_slide(seed=9)
    agl.tl.agl_predict(new, model)
    out = agl.tl.evaluate(new, model, copy=True)
    assert "agl_pcc" not in new.var
    test = out.uns["agl"]["metrics"]["test"]
    assert test["n_spots"] == new.n_obs and "unseen" in test["spots"]
    assert "baselines skipped" in test["notes"] and "pca_ridge" not in test


def test_evaluate_errors():
    adata = small_slide()
    with pytest.raises(KeyError, match="pass model="):
        agl.tl.evaluate(adata)
    with pytest.raises(KeyError, match="not in adata.var_names"):
        agl.tl.evaluate(adata, genes=["zz"])
