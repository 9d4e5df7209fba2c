"""Memory is a function of the batch: a sparse fit allocates no spots x genes array; chunked (dask) prediction
layers equal in-memory ones and stream through write_h5ad; evaluate in gene blocks equals one block."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from builders import FAST, small_slide

import agl_scverse as agl


def _sparse_study(n=12000, g=3000, density=0.03, d=16, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, 3)).astype(np.float32)
    X = sp.random(n, g, density=density, format="csr", dtype=np.float32, random_state=seed)
    X.data = np.ceil(X.data * 5).astype(np.float32)
    lift = sp.csr_matrix((np.abs(Z[:, :1]) > 1).astype(np.float32)) @ sp.csr_matrix(np.ones((1, 50), np.float32))
    X = sp.hstack([X[:, 50:], (lift * 3).tocsr()], format="csr")  # 50 genes that follow the latent state
    a = ad.AnnData(X, var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    a.obs_names = [f"s{i}" for i in range(n)]
    a.obsm["X_emb"] = (np.tanh(Z @ rng.normal(size=(3, d))) + 0.1 * rng.normal(size=(n, d))).astype(np.float32)
    return a


@pytest.mark.slow
def test_sparse_fit_allocates_no_spots_by_genes_array():
    a = _sparse_study()
    dense_bytes = a.n_obs * a.n_vars * 4  # one float32 spots x genes array: 137 MB
    warm = small_slide()  # a first fit imports what fits import lazily (torch._dynamo, numba...): not data memory
    agl.tl.agl_fit(warm, method="agl", embedding_key="X_emb", n_targets=5, min_cells=1, **FAST)
    tracemalloc.start()
    model = agl.tl.agl_fit(
        a, method="agl", embedding_key="X_emb", n_targets=20, min_cells=1, epochs=1, hidden=(16,), progress=False,
        device="cpu",
    )  # fmt: skip
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(model.genes) > 2000
    # what the fit holds at once: a few CSR copies in the gene-role selection, and batches / 4 MB chunks
    bound = 4 * a.X.nnz * 8 + 48 * 2**20
    assert bound < dense_bytes / 1.5
    assert peak < bound, (
        f"peak {peak / 2**20:.0f} MB > {bound / 2**20:.0f} MB (a dense array: {dense_bytes / 2**20:.0f})"
    )


@pytest.fixture(scope="module")
def fitted():
    a = small_slide()
    model = agl.tl.agl_fit(a, method="agl", embedding_key="X_emb", n_targets=5, min_cells=1, **FAST)
    return a, model


def test_dask_layer_equals_the_in_memory_one_and_writes(fitted, tmp_path):
    import dask.array as da

    a, model = fitted
    dense, lazy = a.copy(), a.copy()
    agl.tl.agl_predict(dense, model)
    agl.tl.agl_predict(lazy, model, max_dense_bytes=0)  # force the chunked layer
    assert isinstance(lazy.layers["agl_pred"], da.Array)
    np.testing.assert_array_equal(np.asarray(lazy.layers["agl_pred"]), dense.layers["agl_pred"])
    lazy.write_h5ad(tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    np.testing.assert_array_equal(np.asarray(back.layers["agl_pred"]), dense.layers["agl_pred"])
    # evaluate reads the dask layer block by block, with the same scores
    for x in (dense, lazy):
        x.obs["agl_split"] = "unused"
        agl.tl.evaluate(x, model, genes="predicted", baselines=False)
    np.testing.assert_allclose(lazy.var["agl_pcc"], dense.var["agl_pcc"], equal_nan=True)


@pytest.mark.parametrize("genes", ["targets", "selected", "all"])
def test_predict_genes_choice(fitted, genes):
    a, model = fitted
    b = a.copy()
    agl.tl.agl_predict(b, model, genes=genes)
    predicted = b.var_names[b.var["agl_predicted"]].tolist()
    want = {"targets": model.targets, "selected": model.predicted_genes, "all": model.genes}[genes]
    assert sorted(predicted) == sorted(want)
    with pytest.raises(ValueError, match="Unknown genes"):
        agl.tl.agl_predict(b, model, genes="everything")
    with pytest.raises(KeyError, match="not outputs of the model"):
        agl.tl.agl_predict(b, model, genes=["nope"])


def test_evaluate_in_gene_blocks_equals_one_block(fitted, monkeypatch):
    from agl_scverse.tl import _evaluate

    a, model = fitted
    one, blocks = a.copy(), a.copy()
    for x in (one, blocks):
        agl.tl.agl_predict(x, model, genes="all")
    agl.tl.evaluate(one, model, genes="predicted")
    monkeypatch.setattr(_evaluate, "_BLOCK_BYTES", 4 * 4 * one.n_obs * 3)  # 3 genes per block
    agl.tl.evaluate(blocks, model, genes="predicted")
    for col in ("agl_pcc", "agl_spearman", "agl_mse"):
        np.testing.assert_allclose(blocks.var[col], one.var[col], rtol=1e-6, equal_nan=True)
    assert blocks.uns["agl"]["metrics"]["test"]["model"]["pearson"] == pytest.approx(
        one.uns["agl"]["metrics"]["test"]["model"]["pearson"]
    )


def test_evaluate_computes_each_chunk_of_a_lazy_layer_once(fitted, monkeypatch):
    from agl_scverse.tl import _evaluate, _predict_values

    a, model = fitted
    dense, lazy = a.copy(), a.copy()
    agl.tl.agl_predict(dense, model, genes="all")
    agl.tl.agl_predict(lazy, model, genes="all", max_dense_bytes=0)
    blocks = lazy.layers["agl_pred"].numblocks
    n_chunks = blocks[0] * blocks[1]  # the predicted genes are read from .var["agl_predicted"]
    calls = []
    real = _predict_values._predict_rows
    monkeypatch.setattr(_predict_values, "_predict_rows", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    monkeypatch.setattr(_evaluate, "_BLOCK_BYTES", 4 * 4 * a.n_obs * 3)  # 3 genes per block: many blocks
    for x in (dense, lazy):
        x.obs["agl_split"] = "unused"
        agl.tl.evaluate(x, model, genes="predicted", baselines=False)
    assert 0 < len(calls) <= n_chunks  # once per chunk, not once per gene block (~14 blocks here)
    np.testing.assert_allclose(lazy.var["agl_pcc"], dense.var["agl_pcc"], rtol=1e-6, equal_nan=True)


def test_fit_on_a_backed_anndata_equals_the_in_memory_fit(tmp_path):
    a = _sparse_study(n=1500, g=400, density=0.05)
    a.write_h5ad(tmp_path / "study.h5ad")
    backed = ad.read_h5ad(tmp_path / "study.h5ad", backed="r")
    kw = dict(method="dkgsb", embedding_key="X_emb", n_targets=5, **FAST)
    m_mem = agl.tl.agl_fit(a, **kw)
    m_disk = agl.tl.agl_fit(backed, **kw)  # counts read from disk in row blocks
    assert m_disk.genes == m_mem.genes
    np.testing.assert_array_equal(m_disk.weights, m_mem.weights)
    np.testing.assert_array_equal(m_disk.predict(a.obsm["X_emb"]), m_mem.predict(a.obsm["X_emb"]))
    agl.tl.agl_predict(backed, m_disk)
    agl.tl.agl_predict(a, m_mem)
    np.testing.assert_array_equal(backed.layers["agl_pred"], a.layers["agl_pred"])
    backed.file.close()
