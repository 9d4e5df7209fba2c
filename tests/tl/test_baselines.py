"""Per-gene metrics and baseline predictors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr, spearmanr

from agl_scverse._stats import mse_per_gene, pearson_per_gene, per_gene_metrics, spearman_per_gene
from agl_scverse.tl._baselines import make_pca_ridge, mean_predictor, pca_ridge


def test_metrics_match_scipy():
    rng = np.random.default_rng(0)
    T = rng.normal(size=(40, 6))
    P = T + rng.normal(size=T.shape)
    T[:, 2] = np.round(T[:, 2])  # ties for Spearman
    df = per_gene_metrics(T, P, genes=list("abcdef"))
    assert list(df.columns) == ["gene", "pearson", "spearman", "mse"]
    assert df.gene.tolist() == list("abcdef")
    for j in range(6):
        assert df.pearson[j] == pytest.approx(pearsonr(T[:, j], P[:, j])[0], abs=1e-10)
        assert df.spearman[j] == pytest.approx(spearmanr(T[:, j], P[:, j])[0], abs=1e-10)
        assert df.mse[j] == pytest.approx(np.mean((T[:, j] - P[:, j]) ** 2))
    # sparse observed gives the same
    np.testing.assert_allclose(pearson_per_gene(sp.csr_matrix(T), P), df.pearson)


def test_metrics_constant_and_nan_conventions():
    rng = np.random.default_rng(1)
    T = rng.normal(size=(20, 4))
    P = rng.normal(size=(20, 4))
    T[:, 0] = 3.0  # observed constant -> NaN correlation, MSE still defined
    P[:, 1] = 1.5  # constant prediction -> 0 correlation by default
    P[4, 2] = np.nan  # non-finite prediction -> NaN everything
    df = per_gene_metrics(T, P)
    assert np.isnan(df.pearson[0]) and np.isnan(df.spearman[0]) and np.isfinite(df.mse[0])
    assert df.pearson[1] == 0 and df.spearman[1] == 0
    assert df[["pearson", "spearman", "mse"]].iloc[2].isna().all()
    assert np.isfinite(df.pearson[3])
    assert np.isnan(pearson_per_gene(T, P, constant_pred=np.nan)[1])
    with pytest.raises(ValueError, match="same spots x genes shape"):
        mse_per_gene(T, P[:, :2])
    with pytest.raises(ValueError, match="gene names"):
        per_gene_metrics(T, P, genes=["a"])
    assert spearman_per_gene(T[:, 3], P[:, 3]).shape == (1,)


def test_mean_predictor():
    Y = np.array([[1.0, 4.0], [3.0, 0.0]])
    pred = mean_predictor(np.zeros((2, 5)), Y, np.zeros((7, 5)))
    assert pred.shape == (7, 2) and pred.dtype == np.float32
    np.testing.assert_allclose(pred[3], [2.0, 2.0])
    with pytest.raises(ValueError, match="features"):
        mean_predictor(np.zeros((2, 5)), Y, np.zeros((7, 4)))


def test_pca_ridge_recovers_linear_signal():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 40))
    W = rng.normal(size=(40, 5))
    Y = X @ W + 0.5 * rng.normal(size=(300, 5))
    pred, model = pca_ridge(X[:200], Y[:200], X[200:], return_model=True)
    r = pearson_per_gene(Y[200:], pred)
    assert np.all(r > 0.95)
    assert model.named_steps["pca"].n_components == 40  # capped by features
    # beats the mean predictor on MSE by far
    mse_mean = mse_per_gene(Y[200:], mean_predictor(X[:200], Y[:200], X[200:]))
    assert np.all(mse_per_gene(Y[200:], pred) < 0.1 * mse_mean)
    # on pure noise, the CV-chosen penalty is large (shrinks towards the mean)
    _, m_noise = pca_ridge(X[:200], rng.normal(size=(200, 5)), X[200:], return_model=True)
    assert m_noise.named_steps["ridge"].alpha_ >= 100


def test_pca_ridge_fixed_alpha_and_caps():
    assert make_pca_ridge(n_samples=30, n_features=500).named_steps["pca"].n_components == 30
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 10))
    pred = pca_ridge(X[:40], X[:40, :2], X[40:], alpha=1.0)
    assert pred.shape == (10, 2)
    with pytest.raises(ValueError, match="NaN"):
        pca_ridge(np.full((5, 2), np.nan), np.ones((5, 1)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="alpha"):
        pca_ridge(X[:40], X[:40, :2], X[40:], alpha=-1.0)
