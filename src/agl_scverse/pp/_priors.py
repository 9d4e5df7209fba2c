"""Prior scores that rank the auxiliary genes (higher = better), all on ``log1p`` counts of the training spots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from agl_scverse import _constants as consts
from agl_scverse._expression import take_rows

__all__ = [
    "log1p_columns",
    "hvg_dispersions",
    "streaming_seurat_dispersions",
    "column_nonzero_counts",
    "column_mean_std",
    "coexpression_scores",
    "moran_scores",
    "rank_order",
]


def log1p_columns(X, cols: np.ndarray):
    """log1p of selected columns, sparse stays sparse (float32)."""
    sub = X[:, cols]
    if sp.issparse(sub):
        sub = sp.csr_matrix(sub, dtype=np.float32)
        sub.data = np.log1p(sub.data)
        return sub
    return np.log1p(np.asarray(sub, dtype=np.float32))


#: Training counts (CSR bytes of the rows and genes used) above which dispersions are streamed, not scanpy's.
STREAM_HVG_BYTES = 256 * 2**20


def hvg_dispersions(X, rows: np.ndarray, cols: np.ndarray, genes: pd.Index) -> pd.Series:
    """Seurat-flavour ``dispersions_norm`` of genes ``cols`` on the log1p counts of spots ``rows``."""
    X_rows = take_rows(X, rows) if len(rows) * len(cols) * 4 <= STREAM_HVG_BYTES else None
    if X_rows is not None and (not sp.issparse(X_rows) or X_rows.nnz * 8 <= STREAM_HVG_BYTES):
        import scanpy as sc

        tmp = AnnData(log1p_columns(X_rows, cols), var=pd.DataFrame(index=genes))
        with np.errstate(divide="ignore", invalid="ignore"):
            df = sc.pp.highly_variable_genes(tmp, flavor="seurat", inplace=False)
        return pd.Series(np.asarray(df["dispersions_norm"], dtype=float), index=genes)
    return streaming_seurat_dispersions(X, rows, cols, genes)


def streaming_seurat_dispersions(
    X, rows: np.ndarray, cols: np.ndarray, genes: pd.Index, n_bins: int = 20, chunk: int = 4096
) -> pd.Series:
    """Scanpy's seurat-flavour normalised dispersions, with the per-gene moments accumulated over chunks of spots."""
    cols = np.asarray(cols, dtype=np.int64)
    total, total_sq = np.zeros(len(cols)), np.zeros(len(cols))
    for s in range(0, len(rows), chunk):
        block = take_rows(X, rows[s : s + chunk])[:, cols]
        if sp.issparse(block):
            block = sp.csr_matrix(block, dtype=np.float32)
            vals = np.expm1(np.log1p(block.data)).astype(np.float64)
            total += np.bincount(block.indices, weights=vals, minlength=len(cols))
            total_sq += np.bincount(block.indices, weights=vals * vals, minlength=len(cols))
        else:
            vals = np.expm1(np.log1p(np.asarray(block, dtype=np.float32))).astype(np.float64)
            total += vals.sum(0)
            total_sq += (vals * vals).sum(0)
    n = len(rows)
    mean = total / n
    var = total_sq / n - mean**2
    if n > 1:
        var *= n / (n - 1)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = var / mean
        disp[disp == 0] = np.nan
        disp = np.log(disp)
    df = pd.DataFrame({"means": np.log1p(mean), "dispersions": disp}, index=genes)
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    one = stats["dev"].isnull()
    stats.loc[one, "dev"] = stats.loc[one, "avg"]
    stats.loc[one, "avg"] = 0
    per_gene = stats.loc[df["mean_bin"]].set_index(df.index)
    return pd.Series(((df["dispersions"] - per_gene["avg"]) / per_gene["dev"]).to_numpy(dtype=float), index=genes)


def column_nonzero_counts(X, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Number of spots among ``rows`` with a non-zero count, per gene (chunks of spots)."""
    out = np.zeros(X.shape[1], dtype=np.int64)
    for s in range(0, len(rows), chunk):
        block = take_rows(X, rows[s : s + chunk])
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            out += np.bincount(block.indices[block.data > 0], minlength=X.shape[1])
        else:
            out += (np.asarray(block) > 0).sum(0)
    return out


def column_mean_std(M) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and population standard deviation of a dense or sparse matrix."""
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
    tmp.obsm[consts.SPATIAL_KEY] = np.asarray(adata_sub.obsm[consts.SPATIAL_KEY], dtype=float)[:, :2]
    if library_key is not None:
        tmp.obs[library_key] = pd.Categorical(adata_sub.obs[library_key].astype(str))
    n_neighs = int(min(n_neighs, max(tmp.n_obs - 1, 1)))
    sq.gr.spatial_neighbors_knn(tmp, library_key=library_key, n_neighs=n_neighs)
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
