"""The reduced-rank ridge fit streamed over spots equals the dense closed form, whatever the chunking."""

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV

from agl_scverse._expression import ArrayExpression
from agl_scverse.tl import _rrr
from agl_scverse.tl._rrr import DenseExpression, rrr_fit


def _data(n=300, d=12, c=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)
    Y = X @ rng.normal(size=(d, 3)) @ rng.normal(size=(3, c)) + rng.normal(size=(n, c)) + 5.0
    return X, Y


def _dense_reference(X, Y, n_t, alpha, rank):
    """The textbook fit: ridge on standardised X and z-scored Y, projected on the fitted values' top right vectors."""
    Xs = (X - X.mean(0)) / X.std(0)
    Z = (Y - Y.mean(0)) / Y.std(0)
    B = np.linalg.solve(Xs.T @ Xs + alpha * np.eye(X.shape[1]), Xs.T @ Z)
    V = np.linalg.svd(Xs @ B, full_matrices=False)[2].T
    Br = B @ V[:, :rank] @ V[:n_t, :rank].T
    return (Xs @ Br) * Y.std(0)[:n_t] + Y.mean(0)[:n_t]


@pytest.mark.parametrize("rank", [2, 5, None])
def test_streamed_fit_is_the_dense_closed_form(rank):
    X, Y = _data()
    rows = np.arange(len(X))
    fit = rrr_fit(X, DenseExpression(Y), rows, 8, alpha=3.0)
    pred, r = fit.predict(X, rank, 8, clip=False)
    ref = _dense_reference(X, Y, 8, 3.0, Y.shape[1] if rank is None else rank)
    np.testing.assert_allclose(pred, ref, rtol=1e-4, atol=1e-4)
    assert r == (Y.shape[1] if rank is None else rank)


def test_chunking_and_row_order_do_not_change_the_fit(monkeypatch):
    X, Y = _data(n=257)
    rows = np.random.default_rng(1).permutation(len(X))[:200]
    one = rrr_fit(X, ArrayExpression(Y), rows, 8)
    monkeypatch.setattr(_rrr, "CHUNK_BYTES", 8 * 40 * 7)  # chunks of 7 spots
    many = rrr_fit(X, ArrayExpression(Y), np.sort(rows), 8)
    assert one.alpha == many.alpha
    for rank in (3, None):
        np.testing.assert_allclose(one.predict(X, rank, 8)[0], many.predict(X, rank, 8)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one.y_lo, many.y_lo)
    np.testing.assert_allclose(one.y_std, many.y_std, rtol=1e-10)


def test_first_columns_equal_a_fit_of_those_columns():
    X, Y = _data()
    rows = np.arange(len(X))
    wide = rrr_fit(X, DenseExpression(Y), rows, 8).first(20)
    narrow = rrr_fit(X, DenseExpression(Y), rows, 8, n_cols=20)
    np.testing.assert_allclose(wide.predict(X, 3, 8)[0], narrow.predict(X, 3, 8)[0], rtol=1e-5, atol=1e-5)


def test_penalty_is_chosen_on_evenly_spaced_spots_above_the_cap(monkeypatch):
    X, Y = _data(n=500)
    rows = np.arange(len(X))
    monkeypatch.setattr(_rrr, "MAX_ALPHA_SPOTS", 60)
    fit = rrr_fit(X, DenseExpression(Y), rows, 8, alphas=(0.1, 10.0, 1e3, 1e5))
    pick = np.unique(np.linspace(0, 499, 60).round().astype(int))
    Xs = (X[pick] - X.mean(0)) / X.std(0)
    Zs = (Y[pick, :8] - Y[:, :8].mean(0)) / Y[:, :8].std(0)
    assert fit.alpha == RidgeCV(alphas=(0.1, 10.0, 1e3, 1e5)).fit(Xs, Zs).alpha_


def test_constant_gene_gets_a_constant_prediction():
    X, Y = _data()
    Y[:, 3] = 2.5
    fit = rrr_fit(X, DenseExpression(Y), np.arange(len(X)), 8)
    pred = fit.predict(X, None, 8)[0]
    np.testing.assert_allclose(pred[:, 3], 2.5, atol=1e-6)
    assert np.isfinite(pred).all()
