"""Prior scores that rank the auxiliary genes (higher = better), all on ``log1p`` counts of the training spots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from agl_scverse import _constants as K

__all__ = ["log1p_columns", "hvg_dispersions", "column_mean_std", "coexpression_scores", "moran_scores", "rank_order"]


def log1p_columns(X, cols: np.ndarray):
    """log1p of selected columns, sparse stays sparse (float32)."""
    sub = X[:, cols]
    if sp.issparse(sub):
        sub = sp.csr_matrix(sub, dtype=np.float32)
        sub.data = np.log1p(sub.data)
        return sub
    return np.log1p(np.asarray(sub, dtype=np.float32))


def hvg_dispersions(X_log, genes: pd.Index) -> pd.Series:
    """Scanpy seurat-flavour ``dispersions_norm`` on log1p counts (NaN for genes without variance)."""
    import scanpy as sc

    tmp = AnnData(X_log, var=pd.DataFrame(index=genes))
    with np.errstate(divide="ignore", invalid="ignore"):
        df = sc.pp.highly_variable_genes(tmp, flavor="seurat", inplace=False)
    return pd.Series(np.asarray(df["dispersions_norm"], dtype=float), index=genes)


def column_mean_std(M) -> tuple[np.ndarray, np.ndarray]:
    n = M.shape[0]
    mean = np.asarray(M.mean(axis=0), dtype=np.float64).ravel()
    if sp.issparse(M):
        sq = np.asarray(M.multiply(M).sum(axis=0), dtype=np.float64).ravel() / n
    else:
        sq = (np.asarray(M, dtype=np.float64) ** 2).mean(axis=0)
    return mean, np.sqrt(np.maximum(sq - mean**2, 0.0))


def coexpression_scores(X_aux, X_tgt: np.ndarray) -> np.ndarray:
    """Mean absolute Pearson correlation of each auxiliary column with the target columns (NaN if constant)."""
    n = X_aux.shape[0]
    T = np.asarray(X_tgt, dtype=np.float64)
    t_mean, t_std = column_mean_std(T)
    ok_t = t_std > 0
    Tz = (T[:, ok_t] - t_mean[ok_t]) / t_std[ok_t]  # standardised targets
    if Tz.shape[1] == 0:
        return np.full(X_aux.shape[1], np.nan)
    a_mean, a_std = column_mean_std(X_aux)
    # cov(a, t_z) = E[a t_z] - E[a] E[t_z] = E[a t_z] since t_z has zero mean
    cross = np.asarray(X_aux.T @ Tz, dtype=np.float64) / n  # n_aux x n_targets
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cross / a_std[:, None]
    corr = np.clip(corr, -1.0, 1.0)
    out = np.abs(corr).mean(axis=1)
    out[a_std <= 0] = np.nan
    return out


def moran_scores(adata_sub: AnnData, X_log, genes: pd.Index, library_key: str | None, n_neighs: int) -> np.ndarray:
    """Moran's I of each column of ``X_log`` on the spatial kNN graph of ``adata_sub`` (one graph per slide)."""
    import squidpy as sq

    tmp = AnnData(X_log, obs=pd.DataFrame(index=adata_sub.obs_names), var=pd.DataFrame(index=genes))
    tmp.obsm[K.SPATIAL_KEY] = np.asarray(adata_sub.obsm[K.SPATIAL_KEY], dtype=float)[:, :2]
    if library_key is not None:
        tmp.obs[library_key] = pd.Categorical(adata_sub.obs[library_key].astype(str))
    n_neighs = int(min(n_neighs, max(tmp.n_obs - 1, 1)))
    knn = getattr(sq.gr, "spatial_neighbors_knn", None)
    if knn is not None:
        knn(tmp, library_key=library_key, n_neighs=n_neighs)
    else:  # pragma: no cover - squidpy < 1.8
        sq.gr.spatial_neighbors(tmp, library_key=library_key, coord_type="generic", n_neighs=n_neighs)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = sq.gr.spatial_autocorr(
            tmp, mode="moran", genes=list(genes), n_perms=None, copy=True, n_jobs=1, show_progress_bar=False
        )
    return df["I"].reindex(genes).to_numpy(dtype=float)


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Indices sorting ``scores`` high to low, NaN last, ties kept in input order."""
    s = np.asarray(scores, dtype=float)
    key = np.where(np.isnan(s), np.inf, -s)
    return np.argsort(key, kind="stable")
