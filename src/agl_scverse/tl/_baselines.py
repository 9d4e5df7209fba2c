"""Reference predictors every honest report carries beside the model.

- :func:`mean_predictor`: the per-gene mean of the training spots, for every test spot (no image used).
- :func:`pca_ridge`: HEST-Benchmark-style linear probe on frozen image embeddings:
  ``StandardScaler -> PCA(n_components=256) -> Ridge``.

Both take training embeddings and expression, and test embeddings, and return test predictions on the scale
of the given expression (use :func:`agl_scverse.pp.expression_transform` for it).
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["DEFAULT_RIDGE_ALPHAS", "mean_predictor", "make_pca_ridge", "pca_ridge"]

DEFAULT_RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))
"""Ridge penalties searched by default (0.1 ... 1e5, half-decade steps)."""


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
    """An unfitted ``StandardScaler -> PCA -> Ridge`` pipeline.

    Parameters
    ----------
    n_components
        PCA components (HEST-Benchmark: 256), capped at ``min(n_samples, n_features)`` when those are given.
    alpha
        Fixed ridge penalty. ``None`` (default) picks one penalty for all genes from ``alphas`` by efficient
        leave-one-out cross-validation on the training spots only (:class:`~sklearn.linear_model.RidgeCV`,
        generalised CV). Why not a fixed value: with a few hundred training spots and 256 components, a
        near-unpenalised fit overfits, and the right penalty depends on the number of spots, so it is chosen
        from the training data rather than fixed.
    alphas
        Penalties searched when ``alpha`` is None.
    n_samples, n_features
        Training spots and embedding size, to cap ``n_components``.
    seed
        Random state of the PCA solver.

    Examples
    --------
    >>> make_pca_ridge(n_components=256, n_samples=100, n_features=64).named_steps["pca"].n_components
    64
    """
    caps = [n_components] + [int(v) for v in (n_samples, n_features) if v is not None]
    n_comp = max(1, min(caps))
    if alpha is None:
        reg = RidgeCV(alphas=np.asarray(alphas, dtype=float), alpha_per_target=False)
    else:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        reg = Ridge(alpha=float(alpha))
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("pca", PCA(n_components=n_comp, random_state=seed)),
            ("ridge", reg),
        ]
    )


def pca_ridge(
    X_train,
    Y_train,
    X_test,
    n_components: int = 256,
    alpha: float | None = None,
    alphas: tuple[float, ...] = DEFAULT_RIDGE_ALPHAS,
    seed: int = 0,
    return_model: bool = False,
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
        ``alpha`` is None).

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
    model.fit(X_train, Y_train)
    pred = np.asarray(model.predict(X_test), dtype=np.float32).reshape(X_test.shape[0], -1)
    return (pred, model) if return_model else pred
