"""The reduced-rank ridge fit, streamed over spots: features x genes sums, never a spots x genes matrix.

Everything :func:`rrr_fit` keeps is features x features or features x genes; the spots pass through in chunks of
``CHUNK_BYTES``. The ridge coefficients solve ``(X'X + alpha I) B = X'Z`` (standardised features ``X``, z-scored
genes ``Z``), and the reduced-rank projection takes the right singular vectors of ``L' B`` with ``X'X = L L'``,
whose Gram matrix is that of the fitted values ``XB``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import linalg
from sklearn.linear_model import RidgeCV

from agl_scverse._stats import StreamingMoments

__all__ = ["RRRFit", "rrr_fit", "DEFAULT_RIDGE_ALPHAS", "CHUNK_BYTES", "MAX_ALPHA_SPOTS"]

DEFAULT_RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))
"""Ridge penalties searched by default (0.1 ... 1e5, half-decade steps)."""

#: Float64 bytes of one chunk of spots (features or genes) in a pass of :func:`rrr_fit`.
CHUNK_BYTES = 16 * 2**20
#: Spots (evenly spaced) on which leave-one-out chooses the penalty; :class:`~sklearn.linear_model.RidgeCV` holds
#: them dense, spots x features.
MAX_ALPHA_SPOTS = 20_000


class DenseExpression:
    """A dense spots x genes array in the ``batch(rows, n_first)`` interface of the expression sources."""

    def __init__(self, Y: np.ndarray):
        self.Y = Y
        self.n_cols = Y.shape[1]

    def batch(self, idx: np.ndarray, n_first: int | None = None) -> np.ndarray:
        """Rows ``idx`` of the first ``n_first`` columns."""
        return self.Y[idx, :n_first]


class RRRFit:
    """A ridge fit of z-scored genes on standardised features, with its reduced-rank projections."""

    def __init__(self, x_mean, x_std, y_mean, y_std, y_lo, y_hi, alpha, B, cols, x_shift, chol, n_spots):
        self.x_mean, self.x_std, self.y_mean, self.y_std = x_mean, x_std, y_mean, y_std
        self.y_lo, self.y_hi, self.alpha, self.B, self.cols = y_lo, y_hi, float(alpha), B, cols
        self._x_shift, self._chol, self.n_spots = x_shift, chol, int(n_spots)
        self._V: np.ndarray | None = None

    def first(self, n_cols: int) -> RRRFit:
        """The fit of the first ``n_cols`` genes only (ridge columns are independent; the subspace is not)."""
        return RRRFit(
            self.x_mean, self.x_std, self.y_mean[:n_cols], self.y_std[:n_cols], self.y_lo[:n_cols], self.y_hi[:n_cols], self.alpha,
            self.B[:, :n_cols], self.cols[:n_cols], self._x_shift, self._chol, self.n_spots,
        )  # fmt: skip

    def coefficients(self, rank: int | None, n_first: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Coefficients (standardised features x the first ``n_first`` z-scored genes), intercepts, the rank used."""
        B, n_cols = self.B, self.B.shape[1]
        r = n_cols if rank is None else min(int(rank), self.n_spots, n_cols)
        if r < n_cols:
            if self._V is None:  # right singular vectors of the fitted values X B
                self._V = np.linalg.svd(self._chol.T @ B, full_matrices=False)[2].T
            B = B @ self._V[:, :r] @ self._V[:n_first, :r].T  # restricted to the shared subspace
        else:
            B = B[:, :n_first]
        B = B / self.cols[:n_first]
        return B, -self._x_shift @ B, r

    def predict(self, X: np.ndarray, rank: int | None, n_first: int, clip: bool = True) -> tuple[np.ndarray, int]:
        """Predictions of the first ``n_first`` genes (``float32``, clipped to their training range) and the rank."""
        coef, intercept, r = self.coefficients(rank, n_first)
        pred = ((np.asarray(X, dtype=np.float64) - self.x_mean) / self.x_std) @ coef + intercept
        pred = pred * self.y_std[:n_first] + self.y_mean[:n_first]
        if clip:
            pred = np.clip(pred, self.y_lo[:n_first], self.y_hi[:n_first])
        return pred.astype(np.float32), r


def _nonzero(sd: np.ndarray) -> np.ndarray:
    return np.where(sd > 1e-12, sd, 1.0)


def rrr_fit(
    features: np.ndarray,
    expr: Any,
    rows: np.ndarray,
    n_targets: int,
    *,
    n_cols: int | None = None,
    aux_weight: float | np.ndarray = 1.0,
    alpha: float | None = None,
    alphas: tuple[float, ...] = DEFAULT_RIDGE_ALPHAS,
) -> RRRFit:
    """The ridge fit of the first ``n_cols`` genes of ``expr`` on ``features``, over spots ``rows``.

    Features are standardised and genes z-scored on those spots; the auxiliary columns (after the first
    ``n_targets``) are scaled by ``sqrt(aux_weight)``, and left out where it is 0. ``alpha`` is chosen for the
    targets by efficient leave-one-out (:class:`~sklearn.linear_model.RidgeCV`, on at most
    :data:`MAX_ALPHA_SPOTS` spots) unless given. ``expr`` is anything with ``batch(rows, n_first)`` returning
    spots x genes values (:class:`~agl_scverse._expression.ExpressionBatches`, :class:`DenseExpression`).
    """
    rows = np.asarray(rows, dtype=np.int64)
    n, n_t, d = len(rows), int(n_targets), features.shape[1]
    c = expr.n_cols if n_cols is None else int(n_cols)
    w = np.broadcast_to(np.asarray(aux_weight, dtype=np.float64), (c - n_t,))
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("aux_weight must be finite and >= 0.")
    step = max(1, CHUNK_BYTES // (8 * max(c, d, 1)))
    chunks = [rows[s : s + step] for s in range(0, n, step)]

    xm = StreamingMoments(d)
    for idx in chunks:
        xm.update(features[idx])
    x_mean, x_std = xm.mean, _nonzero(xm.std)
    gram, XtY, x_sum, ym, targets = np.zeros((d, d)), np.zeros((d, c)), np.zeros(d), StreamingMoments(c), []
    for idx in chunks:
        Xs = (np.asarray(features[idx], dtype=np.float64) - x_mean) / x_std
        Y = np.asarray(expr.batch(idx, c), dtype=np.float64)
        gram += Xs.T @ Xs
        XtY += Xs.T @ Y
        x_sum += Xs.sum(0)
        ym.update(Y)
        targets.append(Y[:, :n_t].copy())  # not a view: the chunk goes
    x_shift = x_sum / n  # the standardised features' mean: 0 up to rounding
    gram -= np.outer(x_sum, x_sum) / n
    y_mean, y_std, y_lo, y_hi = ym.mean, _nonzero(ym.std), ym.min, ym.max
    cols = np.concatenate([np.ones(n_t), np.sqrt(w)])
    XtZ = (XtY - np.outer(x_sum, y_mean)) * (cols / y_std)  # X'Z of the centred features and z-scored genes
    if alpha is None:
        pick = np.unique(np.linspace(0, n - 1, min(n, MAX_ALPHA_SPOTS)).round().astype(np.int64))
        Xa = (np.asarray(features[rows[pick]], dtype=np.float64) - x_mean) / x_std
        Za = (np.concatenate(targets)[pick] - y_mean[:n_t]) / y_std[:n_t]
        alpha = float(RidgeCV(alphas=np.asarray(alphas, dtype=float)).fit(Xa, Za).alpha_)
    B = linalg.solve(gram + alpha * np.eye(d), XtZ, assume_a="pos")
    lam, vecs = np.linalg.eigh(gram)
    chol = vecs * np.sqrt(np.clip(lam, 0.0, None))  # X'X = chol chol'
    keep = cols > 0
    return RRRFit(
        x_mean,
        x_std,
        y_mean[keep],
        y_std[keep],
        y_lo[keep],
        y_hi[keep],
        alpha,
        B[:, keep],
        cols[keep],
        x_shift,
        chol,
        n,
    )
