"""The expression scale: the one place that turns raw counts into the model's expression values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import _constants as K
from ._constants import Transform
from ._validate import check_choice, check_counts

__all__ = ["expression_transform"]


def expression_transform(
    X: Any,
    transform: Transform = "log1p",
    columns: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Turn raw counts into the model's expression values (dense ``float32``).

    This is the single definition of the expression scale used for training targets, predictions, baselines
    and metrics, so that every part of the package compares like with like.

    Parameters
    ----------
    X
        Raw counts, spots x genes (NumPy array or SciPy sparse matrix). Must be finite and non-negative.
    transform
        - ``"log1p"`` (default): ``log(1 + counts)``, the HEST-Benchmark protocol.
        - ``"log1p_cpm"``: library-size normalisation to 10,000 counts per spot (scanpy's
          ``normalize_total(target_sum=1e4)``), then ``log1p``. Spots with no counts stay 0.
        - ``"none"``: the counts as they are (as ``float32``).
    columns
        Optional gene columns (integer positions or a boolean mask) to return. The library size of
        ``"log1p_cpm"`` is always computed over **all** columns of ``X``, so pass the full matrix and select
        here rather than subsetting first.

    Returns
    -------
    Dense ``float32`` array, spots x selected genes.

    Examples
    --------
    >>> import numpy as np
    >>> expression_transform(np.array([[0, 1], [3, 0]]))
    array([[0.       , 0.6931472],
           [1.3862944, 0.       ]], dtype=float32)
    >>> expression_transform(np.array([[1, 3]]), "log1p_cpm").round(2)
    array([[7.82, 8.92]], dtype=float32)
    """
    check_choice("transform", transform, K.TRANSFORMS)
    if not (sp.issparse(X) or isinstance(X, np.ndarray)):
        X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D spots x genes matrix, got shape {X.shape}.")
    check_counts(X, what="counts")
    if sp.issparse(X):
        X = sp.csr_matrix(X)
    if transform == "log1p_cpm":
        totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    if columns is not None:
        columns = np.asarray(columns)
        X = X[:, columns]
    out = X.toarray() if sp.issparse(X) else np.array(X, copy=True)
    out = out.astype(np.float32, copy=False)
    if transform == "log1p_cpm":
        out *= scale[:, None].astype(np.float32)
    if transform in ("log1p", "log1p_cpm"):
        np.log1p(out, out=out)
    return out
