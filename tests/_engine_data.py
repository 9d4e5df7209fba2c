"""Small AnnData for the engine tests: Poisson counts driven by a latent state the embedding sees."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

FAST = {"hidden": (16,), "epochs": 4, "patience": 10, "batch_size": 32, "meta_batch_size": 32, "progress": False}


def small_slide(n: int = 120, n_genes: int = 60, d: int = 12, seed: int = 0, sparse: bool = True) -> AnnData:
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, 3))
    X_emb = np.tanh(Z @ rng.normal(size=(3, d))) + 0.2 * rng.normal(size=(n, d))
    L = rng.normal(size=(3, n_genes)) * np.linspace(1.0, 0.1, n_genes)
    mu = np.exp(0.5 + 0.6 * Z @ L)
    counts = rng.poisson(mu).astype(np.float32)
    side = int(np.ceil(np.sqrt(n)))
    xy = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(float) * 100 + 50
    adata = AnnData(
        X=sp.csr_matrix(counts) if sparse else counts,
        obs=pd.DataFrame({"slide": np.where(np.arange(n) < n // 2, "A", "B")}, index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    adata.obsm["spatial"] = xy
    adata.obsm["X_emb"] = X_emb.astype(np.float32)
    return adata


def snapshot(adata: AnnData) -> dict:
    """What a failed call must leave unchanged."""
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X).copy()
    return {
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "uns": sorted(adata.uns.keys()),
        "obsm": {k: np.asarray(v).copy() for k, v in adata.obsm.items()},
        "layers": sorted(adata.layers.keys()),
        "X": X,
    }


def assert_unchanged(adata: AnnData, snap: dict) -> None:
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    assert sorted(adata.uns.keys()) == snap["uns"]
    assert sorted(adata.layers.keys()) == snap["layers"]
    assert set(adata.obsm.keys()) == set(snap["obsm"])
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[k]), v)
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(X, snap["X"])
