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


def test_ridge_targets_are_z_scored_and_predictions_clipped():
    # with z-scored targets, multiplying one gene by 1000 changes neither the penalty nor the other genes
    rng = np.random.default_rng(4)
    X = rng.normal(size=(120, 15))
    Y = X @ rng.normal(size=(15, 3)) + 2.0 * rng.normal(size=(120, 3))
    Y[:, 0] = rng.normal(size=120)  # gene 0 is pure noise: alone it asks for the largest penalty
    Y2 = Y.copy()
    Y2[:, 0] *= 1000.0
    p1, m1 = pca_ridge(X[:90], Y[:90], X[90:], return_model=True, clip=False)
    p2, m2 = pca_ridge(X[:90], Y2[:90], X[90:], return_model=True, clip=False)
    assert m1.named_steps["ridge"].alpha_ == m2.named_steps["ridge"].alpha_
    np.testing.assert_allclose(p1[:, 1:], p2[:, 1:], rtol=1e-5)
    np.testing.assert_allclose(p2[:, 0], 1000 * p1[:, 0], rtol=1e-4)
    _, m_raw = pca_ridge(X[:90], Y2[:90], X[90:], return_model=True, standardize_targets=False)
    assert m_raw.named_steps["ridge"].alpha_ != m1.named_steps["ridge"].alpha_  # raw: the big gene decides
    # clipping: every prediction lies in the training range of its gene
    pc = pca_ridge(X[:90], Y[:90], 5 * X[90:])
    assert np.all(pc <= Y[:90].max(0) + 1e-6) and np.all(pc >= Y[:90].min(0) - 1e-6)
    assert not np.allclose(pc, pca_ridge(X[:90], Y[:90], 5 * X[90:], clip=False))


def test_reduced_rank_ridge_full_rank_is_ridge_and_auxiliaries_help():
    from sklearn.linear_model import Ridge

    from agl_scverse.tl import reduced_rank_ridge

    rng = np.random.default_rng(5)
    n, d, n_t, n_aux = 160, 30, 4, 60
    X = rng.normal(size=(n, d))
    H = X @ rng.normal(size=(d, 2))  # a rank-2 signal shared by every gene
    Y = np.hstack(
        [
            H @ rng.normal(size=(2, n_t)) + 4.0 * rng.normal(size=(n, n_t)),  # noisy targets
            H @ rng.normal(size=(2, n_aux)) + 0.3 * rng.normal(size=(n, n_aux)),
        ]
    )  # clean auxiliaries
    tr, te = slice(0, 100), slice(100, None)
    # full rank, no auxiliaries: plain ridge on standardised features and z-scored targets
    pred, info = reduced_rank_ridge(X[tr], Y[tr, :n_t], X[te], None, alpha=10.0, clip=False, return_info=True)
    xm, xs = X[tr].mean(0), X[tr].std(0)
    ym, ys = Y[tr, :n_t].mean(0), Y[tr, :n_t].std(0)
    ref = Ridge(alpha=10.0).fit((X[tr] - xm) / xs, (Y[tr, :n_t] - ym) / ys).predict((X[te] - xm) / xs) * ys + ym
    np.testing.assert_allclose(pred, ref, rtol=1e-6, atol=1e-8)
    assert info == {"alpha": 10.0, "rank": n_t}

    def score(p):
        return np.mean([np.corrcoef(p[:, j], Y[te, j])[0, 1] for j in range(n_t)])

    with_aux = score(reduced_rank_ridge(X[tr], Y[tr], X[te], 2, n_targets=n_t))
    without = score(reduced_rank_ridge(X[tr], Y[tr, :n_t], X[te], None))
    zero_w = score(reduced_rank_ridge(X[tr], Y[tr], X[te], 2, n_targets=n_t, aux_weight=0.0))
    assert with_aux > without + 0.05  # the clean auxiliaries find the subspace the noisy targets cannot
    assert with_aux > zero_w
    with pytest.raises(ValueError, match="rank"):
        reduced_rank_ridge(X[tr], Y[tr], X[te], 0)
    with pytest.raises(ValueError, match="n_targets"):
        reduced_rank_ridge(X[tr], Y[tr], X[te], 2, n_targets=0)
