"""The expression scale: the one place that turns raw counts into the model's expression values."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import _constants as consts
from ._constants import Transform
from ._validate import check_choice, check_counts

__all__ = [
    "expression_transform",
    "take_rows",
    "ExpressionBatches",
    "ArrayExpression",
    "predicted_library_size",
    "rescale_predictions",
    "observed_transform",
    "predicted_mask",
]


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
    check_choice("transform", transform, consts.TRANSFORMS)
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


def _predicted_counts(Y: np.ndarray, transform: Transform) -> np.ndarray:
    """Predictions in the model's scale back to (non-negative) counts: ``expm1`` of a log scale."""
    Y = np.asarray(Y, dtype=np.float32)
    counts = np.expm1(Y) if transform in (consts.TRANSFORM_LOG1P, consts.TRANSFORM_LOG1P_CPM) else Y.copy()
    return np.maximum(counts, 0.0, out=counts)


def predicted_library_size(Y: np.ndarray, transform: Transform) -> np.ndarray:
    """Per spot, the sum of the predicted counts of the genes in ``Y`` (model scale ``transform``), float64."""
    return _predicted_counts(Y, transform).sum(axis=1, dtype=np.float64)


def rescale_predictions(
    Y: np.ndarray, transform: Transform, scale: str, library: np.ndarray | None = None
) -> np.ndarray:
    """Predictions in the model's scale (``transform``) to the scale asked for (``scale``), float32."""
    check_choice("scale", scale, consts.PRED_SCALES)
    if scale == consts.SCALE_MODEL or transform == consts.TRANSFORM_LOG1P_CPM:
        return np.asarray(Y, dtype=np.float32)
    if library is None:
        raise ValueError("scale='log1p_cp10k' needs the library size of every spot (predicted_library_size).")
    library = np.asarray(library, dtype=np.float64).ravel()
    factor = np.divide(consts.CP10K_TARGET_SUM, library, out=np.zeros_like(library), where=library > 0)
    out = _predicted_counts(Y, transform)
    out *= factor[:, None].astype(np.float32)
    return np.log1p(out, out=out)


def observed_transform(record: dict | None, model_transform: Transform) -> Transform:
    """The transform that puts the measured counts on the scale of a prediction layer."""
    record = record or {}
    if record.get("scale") == consts.SCALE_LOG1P_CP10K:
        return consts.TRANSFORM_LOG1P_CPM
    return record.get("transform") or model_transform


def predicted_mask(adata: Any, keys: Any) -> np.ndarray:
    """Which genes have predictions in ``.layers[keys.pred_layer]``: ``.var[keys.predicted]``."""
    if keys.predicted in adata.var:
        return adata.var[keys.predicted].to_numpy(dtype=bool)
    return np.isfinite(np.asarray(adata.layers[keys.pred_layer][:1], dtype=np.float32)).ravel()


def take_rows(X: Any, idx: np.ndarray):
    """Rows ``idx`` (in that order) of an in-memory or backed (h5py / zarr) spots x genes matrix."""
    idx = np.asarray(idx, dtype=np.int64)
    if isinstance(X, np.ndarray) or sp.issparse(X):
        return X[idx]
    order = np.argsort(idx, kind="stable")
    uniq, inv = np.unique(idx[order], return_inverse=True)
    block = X[uniq]
    back = np.empty(len(idx), dtype=np.int64)
    back[order] = inv
    return block[back]


#: Rows of counts (as dense float32 bytes over all genes) read at once by :meth:`ExpressionBatches.batch`.
_ROW_BLOCK_BYTES = 256 * 2**20


class ExpressionBatches:
    """The model's expression values of some genes, sliced per batch of spots from the counts, never all at once."""

    def __init__(self, X: Any, columns: Sequence[int] | np.ndarray, transform: Transform = "log1p"):
        check_choice("transform", transform, consts.TRANSFORMS)
        self.X = X
        self.columns = np.asarray(columns, dtype=np.int64)
        self.transform = transform

    @property
    def n_cols(self) -> int:
        """Number of genes returned."""
        return len(self.columns)

    def batch(self, idx: np.ndarray, n_first: int | None = None) -> np.ndarray:
        """Transformed expression of spots ``idx`` (of the first ``n_first`` genes only, when given)."""
        cols = self.columns if n_first is None else self.columns[:n_first]
        idx = np.asarray(idx)
        step = max(1, int(_ROW_BLOCK_BYTES // (4 * max(self.X.shape[1], 1))))
        if len(idx) <= step:
            return expression_transform(take_rows(self.X, idx), self.transform, columns=cols)
        return np.concatenate(
            [
                expression_transform(take_rows(self.X, idx[s : s + step]), self.transform, columns=cols)
                for s in range(0, len(idx), step)
            ]
        )

    def chunks(self, idx: np.ndarray, max_bytes: float = 4 * 2**20, n_first: int | None = None) -> Iterator[tuple]:
        """``(positions, values)`` for consecutive chunks of ``idx`` of at most ``max_bytes`` of float32 values."""
        n_cols = self.n_cols if n_first is None else n_first
        step = max(1, int(max_bytes // (4 * max(n_cols, 1))))
        for s in range(0, len(idx), step):
            yield idx[s : s + step], self.batch(idx[s : s + step], n_first)


class ArrayExpression:
    """:class:`ExpressionBatches` over an already transformed dense array (small data, tests)."""

    def __init__(self, Y: Any):
        self.Y = np.asarray(Y, dtype=np.float32)
        if self.Y.ndim != 2:
            raise ValueError(f"Expression must be a spots x genes matrix, got shape {self.Y.shape}.")

    @property
    def n_cols(self) -> int:
        """Number of genes."""
        return self.Y.shape[1]

    def batch(self, idx: np.ndarray, n_first: int | None = None) -> np.ndarray:
        """Rows ``idx`` (first ``n_first`` columns when given)."""
        return self.Y[np.asarray(idx, dtype=np.int64), :n_first]  # one copy of just those values

    chunks = ExpressionBatches.chunks
