"""Reference predictors beside the model: the training mean, PCA + ridge, reduced-rank ridge."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ._rrr import DEFAULT_RIDGE_ALPHAS, DenseExpression, rrr_fit

__all__ = ["DEFAULT_RIDGE_ALPHAS", "mean_predictor", "make_pca_ridge", "pca_ridge", "reduced_rank_ridge"]


def _check_xy(X_train, Y_train, X_test) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X_train = np.asarray(X_train, dtype=np.float64)
    Y_train = np.asarray(Y_train, dtype=np.float64)
    X_test = np.asarray(X_test, dtype=np.float64)
    if Y_train.ndim == 1:
        Y_train = Y_train[:, None]
    if X_train.ndim != 2 or X_test.ndim != 2:
        raise ValueError(f"Embeddings must be 2-D (spots x features); got {X_train.shape} and {X_test.shape}.")
    if X_train.shape[0] != Y_train.shape[0]:
        raise ValueError(f"X_train has {X_train.shape[0]} spots but Y_train has {Y_train.shape[0]}.")
    if X_train.shape[1] != X_test.shape[1]:
        raise ValueError(f"X_train has {X_train.shape[1]} features but X_test has {X_test.shape[1]}.")
    if X_train.shape[0] < 2:
        raise ValueError("At least 2 training spots are needed.")
    for name, a in (("X_train", X_train), ("Y_train", Y_train), ("X_test", X_test)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} holds NaN/inf values.")
    return X_train, Y_train, X_test


def mean_predictor(X_train, Y_train, X_test) -> np.ndarray:
    """Predict every test spot as the mean training expression of each gene.

    Parameters
    ----------
    X_train
        Training embeddings (only their count is used; kept for a uniform signature).
    Y_train
        Training expression, spots x genes.
    X_test
        Test embeddings (only their number of rows is used).

    Returns
    -------
    ``float32`` array, n_test x n_genes. Its per-gene correlation with anything is 0 by the convention of
    :func:`agl_scverse.tl.per_gene_metrics` (a constant prediction).

    Examples
    --------
    >>> import numpy as np
    >>> mean_predictor(np.zeros((2, 4)), [[1.0, 0.0], [3.0, 2.0]], np.zeros((3, 4)))
    array([[2., 1.],
           [2., 1.],
           [2., 1.]], dtype=float32)
    """
    X_train, Y_train, X_test = _check_xy(X_train, Y_train, X_test)
    return np.tile(Y_train.mean(axis=0), (X_test.shape[0], 1)).astype(np.float32)


def make_pca_ridge(
    n_components: int = 256,
    alpha: float | None = None,
    alphas: tuple[float, ...] = DEFAULT_RIDGE_ALPHAS,
    n_samples: int | None = None,
    n_features: int | None = None,
    seed: int = 0,
) -> Pipeline:
    """An unfitted ``StandardScaler -> PCA -> Ridge`` pipeline."""
    caps = [n_components] + [int(v) for v in (n_samples, n_features) if v is not None]
    n_comp = max(1, min(caps))
    if alpha is None:
        reg = RidgeCV(alphas=np.asarray(alphas, dtype=float), alpha_per_target=False)
    else:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        reg = Ridge(alpha=float(alpha))
    return Pipeline([("scale", StandardScaler()), ("pca", PCA(n_components=n_comp, random_state=seed)), ("ridge", reg)])


def pca_ridge(
    X_train,
    Y_train,
    X_test,
    n_components: int = 256,
    alpha: float | None = None,
    alphas: tuple[float, ...] = DEFAULT_RIDGE_ALPHAS,
    seed: int = 0,
    return_model: bool = False,
    standardize_targets: bool = True,
    clip: bool = True,
):
    """Fit ``StandardScaler -> PCA -> Ridge`` on training embeddings and predict the test spots.

    Parameters
    ----------
    X_train
        Training embeddings, spots x features.
    Y_train
        Training expression, spots x genes.
    X_test
        Test embeddings.
    n_components
        PCA components (HEST-Benchmark: 256), capped at ``min(n_train_spots, n_features)``.
    alpha
        Fixed ridge penalty; ``None`` (default) chooses one for all genes from ``alphas`` by leave-one-out
        cross-validation on the training spots.
    alphas
        Penalties searched when ``alpha`` is None.
    seed
        Random state of the PCA solver.
    return_model
        Also return the fitted pipeline (its ``named_steps["ridge"].alpha_`` is the chosen penalty when
        ``alpha`` is None; with ``standardize_targets`` it predicts z-scores).
    standardize_targets
        Fit on per-gene z-scores of ``Y_train`` (mapped back afterwards), so that the penalty chosen by
        leave-one-out weighs every gene alike; ``False`` fits the raw values.
    clip
        Clip each gene's predictions to its training range.

    Returns
    -------
    ``float32`` predictions, n_test x n_genes; with ``return_model``, ``(predictions, pipeline)``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(120, 8))
    >>> Y = X @ rng.normal(size=(8, 3))
    >>> pred = pca_ridge(X[:100], Y[:100], X[100:])
    >>> pred.shape, bool(np.corrcoef(pred[:, 0], Y[100:, 0])[0, 1] > 0.99)
    ((20, 3), True)
    """
    X_train, Y_train, X_test = _check_xy(X_train, Y_train, X_test)
    model = make_pca_ridge(
        n_components=n_components,
        alpha=alpha,
        alphas=alphas,
        n_samples=X_train.shape[0],
        n_features=X_train.shape[1],
        seed=seed,
    )
    mu, sd = _target_scale(Y_train, standardize_targets)
    model.fit(X_train, (Y_train - mu) / sd)
    pred = np.asarray(model.predict(X_test), dtype=np.float64).reshape(X_test.shape[0], -1) * sd + mu
    pred = _clip(pred, Y_train, clip)
    return (pred, model) if return_model else pred


def _target_scale(Y: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    if not standardize:
        return np.zeros(Y.shape[1]), np.ones(Y.shape[1])
    sd = Y.std(axis=0)
    return Y.mean(axis=0), np.where(sd > 1e-12, sd, 1.0)


def _clip(pred: np.ndarray, Y_train: np.ndarray, clip: bool) -> np.ndarray:
    if clip:
        pred = np.clip(pred, Y_train.min(axis=0), Y_train.max(axis=0))
    return pred.astype(np.float32)


#: Ranks tried on validation by the reduced-rank ridge head and baseline (``None``: full rank, plain ridge).
RRR_RANKS: tuple[int | None, ...] = (2, 4, 8, 16, 32, None)


def reduced_rank_ridge(
    X_train,
    Y_train,
    X_test,
    rank: int | None | Sequence[int | None] = 8,
    *,
    n_targets: int | None = None,
    aux_weight: float | np.ndarray = 1.0,
    alpha: float | None = None,
    alphas: tuple[float, ...] = DEFAULT_RIDGE_ALPHAS,
    clip: bool = True,
    return_info: bool = False,
):
    """Reduced-rank ridge ("linear AGL"): targets and auxiliaries share a rank-``rank`` output subspace.

    Features are standardised, every gene z-scored on the training spots. The ridge coefficients
    ``B = (X'X + alpha I)^-1 X'Y`` of all columns (targets, then auxiliaries scaled by ``sqrt(aux_weight)``) are
    projected onto the top-``rank`` right singular vectors ``V`` of the fitted values ``XB``
    (``B_r = B V V'``): the auxiliary columns help choose the subspace in which the targets are predicted, as a
    shared trunk does in AGL. ``alpha`` is chosen for the targets by efficient leave-one-out on the training spots
    (:class:`~sklearn.linear_model.RidgeCV`) unless given.

    Parameters
    ----------
    X_train
        Training embeddings, spots x features.
    Y_train
        Training expression, spots x genes: targets first, then auxiliaries.
    X_test
        Test embeddings.
    rank
        Rank of the coefficient matrix; ``None`` or a rank >= the number of columns: plain ridge. A sequence of
        ranks returns a dict ``rank -> predictions`` (one fit, one SVD).
    n_targets
        Number of leading target columns (default: all columns are targets, no auxiliaries).
    aux_weight
        Weight of the auxiliary columns in the subspace (a number or one per auxiliary); 0 leaves them out.
    alpha
        Fixed penalty (default: chosen by leave-one-out).
    alphas
        Penalties searched by leave-one-out.
    clip
        Clip predictions to each target's training range.
    return_info
        Also return ``{"alpha": ..., "rank": ...}``.

    Returns
    -------
    ``float32`` predictions of the targets, n_test x n_targets (and the info dict).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 10))
    >>> Y = X @ rng.normal(size=(10, 2)) @ rng.normal(size=(2, 30))
    >>> pred = reduced_rank_ridge(X[:150], Y[:150], X[150:], rank=2, n_targets=5)
    >>> pred.shape, bool(np.corrcoef(pred[:, 0], Y[150:, 0])[0, 1] > 0.99)
    ((50, 5), True)
    """
    X_train, Y_train, X_test = _check_xy(X_train, Y_train, X_test)
    n_t = Y_train.shape[1] if n_targets is None else int(n_targets)
    if not 1 <= n_t <= Y_train.shape[1]:
        raise ValueError(f"n_targets={n_targets} must be in [1, {Y_train.shape[1]}] (the columns of Y_train).")
    many = isinstance(rank, Sequence)
    ranks: list[int | None] = list(rank) if isinstance(rank, Sequence) else [rank]
    for r_ in ranks:
        if r_ is not None and (isinstance(r_, bool) or int(r_) < 1):
            raise ValueError(f"rank must be a positive integer or None, got {r_!r}.")
    rows = np.arange(len(X_train))
    fit = rrr_fit(X_train, DenseExpression(Y_train), rows, n_t, aux_weight=aux_weight, alpha=alpha, alphas=alphas)
    preds: dict[int | None, np.ndarray] = {}
    r = 0
    for r_ in ranks:
        preds[r_], r = fit.predict(X_test, r_, n_t, clip)
    if many:
        return (preds, {"alpha": fit.alpha}) if return_info else preds
    pred = preds[ranks[0]]
    return (pred, {"alpha": fit.alpha, "rank": r}) if return_info else pred
