"""Input checks shared by readers and tools. Each raises a clear error naming the problem and the fix."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from . import _constants as K


def check_counts(X, what: str = "adata.X") -> None:
    """Counts must be finite and non-negative."""
    data = X.data if sp.issparse(X) else np.asarray(X)
    if data.size == 0:
        return
    if not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise ValueError(f"{what} holds {n} NaN/inf values; counts must be finite. Fill or drop them first.")
    if data.min() < 0:
        raise ValueError(
            f"{what} holds negative values (min {data.min():.3g}); raw counts are expected. "
            "Pass the raw counts (e.g. layer='counts' or adata.raw.to_adata())."
        )


def check_unique_names(adata: AnnData) -> None:
    """Gene and spot names must be unique."""
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicate gene names {dup}; run adata.var_names_make_unique() first.")
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicate spot barcodes {dup}; run adata.obs_names_make_unique() first.")


def check_not_empty(adata: AnnData) -> None:
    """At least one spot and one gene."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The slide is empty ({adata.n_obs} spots x {adata.n_vars} genes).")


def check_spatial(adata: AnnData) -> np.ndarray:
    """``obsm['spatial']`` must be an n x 2 array of finite pixel coordinates; returns it as float."""
    if K.SPATIAL_KEY not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] is missing: spot centres in full-resolution pixels are required.")
    xy = np.asarray(adata.obsm[K.SPATIAL_KEY], dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"adata.obsm['spatial'] has shape {xy.shape}; expected (n_spots, 2).")
    if not np.all(np.isfinite(xy[:, :2])):
        raise ValueError("adata.obsm['spatial'] holds NaN/inf coordinates.")
    return xy[:, :2]


def check_adata(adata: AnnData, layer: str | None = None) -> None:
    """All the checks a tool runs on its input before touching it."""
    check_not_empty(adata)
    check_unique_names(adata)
    X = adata.layers[layer] if layer is not None else adata.X
    check_counts(X, what=f"adata.layers[{layer!r}]" if layer else "adata.X")
