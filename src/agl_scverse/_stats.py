"""Per-gene agreement between predicted and observed expression (Pearson, Spearman, MSE).

Convention for degenerate genes (documented once, used everywhere):

- **observed constant** over the evaluated spots (e.g. a gene never detected on the held-out slide): the
  correlation is undefined, so ``pearson`` and ``spearman`` are **NaN**; such genes drop out of means taken
  with ``nanmean``. ``mse`` is still reported.
- **prediction constant** while the observation varies (e.g. the mean predictor): the prediction carries no
  information on which spots are high or low, so ``pearson`` and ``spearman`` are ``constant_pred`` (**0** by
  default; pass ``np.nan`` to get NaN instead).
- a gene whose observed or predicted column holds any NaN/inf (e.g. a gene a model does not output, NaN in
  ``.layers["agl_pred"]``) gets NaN for all three metrics.

"Constant" means exactly constant (peak-to-peak range 0), computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata

__all__ = [
    "pearson_per_gene",
    "mean_pearson",
    "spearman_per_gene",
    "mse_per_gene",
    "per_gene_metrics",
    "StreamingMoments",
]

#: per_gene_metrics works in float64 on column chunks of at most this many bytes (per copy).
_CHUNK_BYTES = 16 * 2**20


def _as_2d(Y, name: str) -> np.ndarray:
    Y = Y.toarray() if sp.issparse(Y) else np.asarray(Y)
    Y = Y.astype(np.float64, copy=False)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise ValueError(f"{name} must be a spots x genes matrix, got shape {Y.shape}.")
    return Y


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    T, P = _as_2d(y_true, "y_true"), _as_2d(y_pred, "y_pred")
    if T.shape != P.shape:
        raise ValueError(f"y_true {T.shape} and y_pred {P.shape} must have the same spots x genes shape.")
    finite = np.isfinite(T).all(axis=0) & np.isfinite(P).all(axis=0)
    return T, P, finite


def _corr_cols(T: np.ndarray, P: np.ndarray, finite: np.ndarray, constant_pred: float) -> np.ndarray:
    out = np.full(T.shape[1], np.nan)
    if T.shape[0] < 2:
        return out
    Tf, Pf = T[:, finite], P[:, finite]
    t_const = np.ptp(Tf, axis=0) == 0
    p_const = np.ptp(Pf, axis=0) == 0
    Tc = Tf - Tf.mean(axis=0)
    Pc = Pf - Pf.mean(axis=0)
    num = (Tc * Pc).sum(axis=0)
    den = np.sqrt((Tc**2).sum(axis=0) * (Pc**2).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(num / den, -1.0, 1.0)
    r[p_const] = constant_pred
    r[t_const] = np.nan
    out[finite] = r
    return out


def pearson_per_gene(y_true, y_pred, constant_pred: float = 0.0) -> np.ndarray:
    """Pearson correlation of each gene (column) across spots (rows)."""
    T, P, finite = _pair(y_true, y_pred)
    return _corr_cols(T, P, finite, constant_pred)


def mean_pearson(y_true, y_pred) -> float:
    """Mean Pearson r over the genes, with the module's convention: the one score for model selection."""
    r = pearson_per_gene(y_true, y_pred)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def spearman_per_gene(y_true, y_pred, constant_pred: float = 0.0) -> np.ndarray:
    """Spearman rank correlation (average ranks for ties) of each gene across spots."""
    T, P, finite = _pair(y_true, y_pred)
    if T.shape[0] >= 1 and finite.any():
        T = T.copy()
        P = P.copy()
        T[:, finite] = rankdata(T[:, finite], axis=0)
        P[:, finite] = rankdata(P[:, finite], axis=0)
    return _corr_cols(T, P, finite, constant_pred)


def mse_per_gene(y_true, y_pred) -> np.ndarray:
    """Mean squared error of each gene across spots (NaN where a column holds NaN/inf)."""
    T, P, finite = _pair(y_true, y_pred)
    out = np.full(T.shape[1], np.nan)
    if T.shape[0] > 0:
        out[finite] = ((P[:, finite] - T[:, finite]) ** 2).mean(axis=0)
    return out


def per_gene_metrics(y_true, y_pred, genes: Sequence[str] | None = None, constant_pred: float = 0.0) -> pd.DataFrame:
    """Pearson, Spearman and MSE of each gene between observed and predicted expression.

    Compare on the same scale the model was trained on (see
    :func:`agl_scverse.pp.expression_transform`).

    Parameters
    ----------
    y_true
        Observed matrix, spots x genes.
    y_pred
        Predicted matrix, same shape.
    genes
        Gene names (default ``"0"``, ``"1"``, ...).
    constant_pred
        Correlation given to a constant prediction of a varying gene (module docstring).

    Returns
    -------
    DataFrame with columns ``gene``, ``pearson``, ``spearman``, ``mse``, one row per gene, in column order.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(size=(50, 3))
    >>> df = per_gene_metrics(y, y + 0.1 * rng.normal(size=y.shape), genes=["a", "b", "c"])
    >>> list(df.columns), bool((df.pearson > 0.9).all())
    (['gene', 'pearson', 'spearman', 'mse'], True)
    """
    if not sp.issparse(y_true) and not sp.issparse(y_pred):  # keep float32 inputs; float64 per column chunk
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        if y_true.ndim == 1:
            y_true, y_pred = y_true[:, None], y_pred.reshape(-1, 1)
        if y_true.shape != y_pred.shape:
            raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must have the same spots x genes shape.")
    n_rows, n_cols = y_true.shape
    if genes is None:
        genes = [str(i) for i in range(n_cols)]
    genes = [str(g) for g in genes]
    if len(genes) != n_cols:
        raise ValueError(f"{len(genes)} gene names for {n_cols} columns.")
    step = n_cols if sp.issparse(y_true) or sp.issparse(y_pred) else max(1, _CHUNK_BYTES // (8 * max(n_rows, 1)))
    parts = []
    for c in range(0, max(n_cols, 1), step):
        T, P, _ = _pair(y_true[:, c : c + step], y_pred[:, c : c + step])
        parts.append(
            (pearson_per_gene(T, P, constant_pred), spearman_per_gene(T, P, constant_pred), mse_per_gene(T, P))
        )
    cols = [np.concatenate([p[i] for p in parts]) for i in range(3)]
    return pd.DataFrame({"gene": genes, "pearson": cols[0], "spearman": cols[1], "mse": cols[2]})


class StreamingMoments:
    """Per-column count, mean, second moment, min and max, accumulated batch by batch in float64."""

    def __init__(self, n_cols: int, paired: bool = False):
        self.n = 0
        self.mean = np.zeros(n_cols)
        self.m2 = np.zeros(n_cols)
        self.min = np.full(n_cols, np.inf)
        self.max = np.full(n_cols, -np.inf)
        self.paired = paired
        if paired:
            self.mean_b = np.zeros(n_cols)
            self.m2_b = np.zeros(n_cols)
            self.co = np.zeros(n_cols)

    def update(self, A, B=None) -> None:
        """Add the rows of ``A`` (and of ``B`` with ``paired=True``)."""
        A = np.asarray(A, dtype=np.float64)
        n_b = A.shape[0]
        if n_b == 0:
            return
        mean_a = A.mean(0)
        ca = A - mean_a
        n, n_new = self.n, self.n + n_b
        delta = mean_a - self.mean
        self.mean = self.mean + delta * (n_b / n_new)
        self.m2 = self.m2 + (ca * ca).sum(0) + delta * delta * (n * n_b / n_new)
        self.min = np.minimum(self.min, A.min(0))
        self.max = np.maximum(self.max, A.max(0))
        if self.paired:
            B = np.asarray(B, dtype=np.float64)
            mean_bb = B.mean(0)
            cb = B - mean_bb
            delta_b = mean_bb - self.mean_b
            self.mean_b = self.mean_b + delta_b * (n_b / n_new)
            self.m2_b = self.m2_b + (cb * cb).sum(0) + delta_b * delta_b * (n * n_b / n_new)
            self.co = self.co + (ca * cb).sum(0) + delta * delta_b * (n * n_b / n_new)
        self.n = n_new

    @property
    def var(self) -> np.ndarray:
        """Population variance of each column (of ``A``)."""
        return self.m2 / max(self.n, 1)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation of each column (of ``A``)."""
        return np.sqrt(self.var)

    @property
    def cov(self) -> np.ndarray:
        """Population covariance of each column of ``A`` with the same column of ``B`` (``paired=True``)."""
        return self.co / max(self.n, 1)
