"""Streaming helpers: moments accumulated per batch equal the one-shot ones; expression batches equal the
whole-matrix transform; standardised targets equal the dense z-scores."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from agl_scverse._expression import ArrayExpression, ExpressionBatches, expression_transform, take_rows
from agl_scverse._stats import StreamingMoments
from agl_scverse.train._trainer import StandardizedTargets


def _counts(n=300, g=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.5, 2.0, size=g), size=(n, g)).astype(np.float32)
    X[:, 3] = 0  # an all-zero gene
    return sp.csr_matrix(X)


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_streaming_moments_equal_dense_ones(batch):
    rng = np.random.default_rng(1)
    A = rng.normal(3.0, 2.0, size=(257, 5)).astype(np.float32)
    B = (A * 0.5 + rng.normal(size=A.shape)).astype(np.float32)
    m = StreamingMoments(5, paired=True)
    for s in range(0, len(A), batch):
        m.update(A[s : s + batch], B[s : s + batch])
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    np.testing.assert_allclose(m.mean, A64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.var, A64.var(0), rtol=1e-10)
    np.testing.assert_allclose(m.cov, ((A64 - A64.mean(0)) * (B64 - B64.mean(0))).mean(0), rtol=1e-9)
    np.testing.assert_array_equal(m.min, A.min(0))
    np.testing.assert_array_equal(m.max, A.max(0))
    assert m.n == len(A)


@pytest.mark.parametrize("transform", ["log1p", "log1p_cpm", "none"])
def test_expression_batches_equal_the_whole_matrix_transform(transform):
    X = _counts()
    cols = np.random.default_rng(0).permutation(X.shape[1])[:25]
    idx = np.random.default_rng(1).permutation(X.shape[0])[:100]
    whole = expression_transform(X, transform, columns=cols)
    eb = ExpressionBatches(X, cols, transform)
    np.testing.assert_array_equal(eb.batch(idx), whole[idx])
    np.testing.assert_array_equal(eb.batch(idx, n_first=4), whole[idx][:, :4])
    got = np.concatenate([v for _, v in eb.chunks(idx, max_bytes=4 * 25 * 9)])  # chunks of 9 spots
    np.testing.assert_array_equal(got, whole[idx])


def test_take_rows_of_a_backed_matrix_keeps_the_order(tmp_path):
    import anndata as ad

    X = _counts()
    ad.AnnData(X).write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    idx = np.array([5, 2, 200, 2, 0])
    np.testing.assert_array_equal(take_rows(backed.X, idx).toarray(), X[idx].toarray())
    backed.file.close()


def test_standardized_targets_equal_dense_z_scores():
    X = _counts()
    cols = np.arange(X.shape[1])
    train = np.arange(0, 300, 2)
    Y = expression_transform(X, "log1p", columns=cols)
    z = StandardizedTargets(ExpressionBatches(X, cols), train)
    mean, std = Y[train].astype(np.float64).mean(0), Y[train].astype(np.float64).std(0)
    np.testing.assert_allclose(z.mean, mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(z.std, np.where(std > 1e-8, std, 1.0), rtol=1e-6)
    dense_z = ((Y.astype(np.float64) - mean) / np.where(std > 1e-8, std, 1.0)).astype(np.float32)
    np.testing.assert_allclose(z(np.arange(10)).numpy(), dense_z[:10], atol=1e-6)
    assert z(np.arange(10), n_first=3).shape == torch.Size([10, 3])
    # an array gives the same statistics as batches of its counts
    za = StandardizedTargets(ArrayExpression(Y), train)
    np.testing.assert_allclose(za.mean, z.mean, rtol=1e-12)


def test_per_gene_metrics_in_column_chunks_equal_one_chunk(monkeypatch):
    from agl_scverse import _stats

    rng = np.random.default_rng(2)
    T = rng.poisson(2.0, size=(60, 23)).astype(np.float32)
    P = (T + rng.normal(size=T.shape)).astype(np.float32)
    T[:, 4] = 1.0  # constant observation: NaN correlations
    whole = _stats.per_gene_metrics(T, P)
    monkeypatch.setattr(_stats, "_CHUNK_BYTES", 8 * 60 * 5)  # five genes per chunk
    chunked = _stats.per_gene_metrics(T, P)
    for col in ("pearson", "spearman", "mse"):
        np.testing.assert_array_equal(chunked[col].to_numpy(), whole[col].to_numpy())


def test_expression_batches_read_many_spots_in_row_blocks(monkeypatch):
    from agl_scverse import _expression

    X = _counts()
    eb = ExpressionBatches(X, np.arange(X.shape[1])[::-1], "log1p_cpm")
    idx = np.random.default_rng(4).permutation(X.shape[0])
    whole = eb.batch(idx)
    monkeypatch.setattr(_expression, "_ROW_BLOCK_BYTES", 4 * X.shape[1] * 7)  # 7 spots per block
    np.testing.assert_array_equal(eb.batch(idx), whole)
    np.testing.assert_array_equal(eb.batch(idx, n_first=5), whole[:, :5])
