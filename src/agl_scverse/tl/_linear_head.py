"""``agl_fit(head="rrr")``: the reduced-rank ridge head ("linear AGL") as a savable linear network."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse._stats import mean_pearson
from agl_scverse.model import EmbeddingHead

from ._baselines import RRR_RANKS
from ._rrr import RRRFit, rrr_fit

__all__ = ["rrr_head", "linear_head", "choose_rrr", "hybrid_linear", "choose_blend_weight", "search_record"]


def linear_head(fit: RRRFit, rank: int | None, n_out: int) -> tuple[EmbeddingHead, dict]:
    """The reduced-rank ridge ``fit`` (its first ``n_out`` genes at ``rank``) as a linear :class:`EmbeddingHead`."""
    coef, intercept, r = fit.coefficients(rank, n_out)
    net = EmbeddingHead(len(fit.x_mean), n_out, hidden=(), dropout=0.0)

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32)

    with torch.no_grad():
        net.set_input_scaling(f32(fit.x_mean), f32(fit.x_std))
        net.out.weight.copy_(f32(coef.T))
        net.out.bias.copy_(f32(intercept))
        net.get_buffer("out_scale").copy_(f32(fit.y_std[:n_out]))
        net.get_buffer("out_shift").copy_(f32(fit.y_mean[:n_out]))
        net.get_buffer("out_lo").copy_(f32(fit.y_lo[:n_out]))
        net.get_buffer("out_hi").copy_(f32(fit.y_hi[:n_out]))
    return net.eval(), {"rank": int(r), "alpha": float(fit.alpha)}


def rrr_head(
    features: np.ndarray,
    expr,
    rows: np.ndarray,
    n_targets: int,
    rank: int | None,
    n_cols: int | None = None,
    n_out: int | None = None,
) -> tuple[EmbeddingHead, dict]:
    """The reduced-rank ridge fit on spots ``rows`` (of the first ``n_cols`` genes) as a linear head."""
    fit = rrr_fit(features, expr, rows, n_targets, n_cols=n_cols)
    return linear_head(fit, rank, fit.B.shape[1] if n_out is None else int(n_out))


def hybrid_linear(
    features: np.ndarray,
    expr,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    n_targets: int,
    ks: Sequence[int],
    refit: bool,
    mlp_val: np.ndarray | None = None,
) -> tuple[EmbeddingHead, dict]:
    """The linear head of ``agl_fit(head="hybrid")``: a reduced-rank ridge of the targets, and its blend weight."""
    k, rank, scores, fit = choose_rrr(features, expr, train_idx, val_idx, n_targets, ks)
    if refit or fit is None:
        rows = np.sort(np.concatenate([train_idx, val_idx])) if refit else train_idx
        net, info = rrr_head(features, expr, rows, n_targets, rank, n_cols=n_targets + k, n_out=n_targets)
    else:
        net, info = linear_head(fit.first(n_targets + k), rank, n_targets)
    weight, w_scores = consts.HYBRID_LINEAR_WEIGHT, dict[float, float]()
    if mlp_val is not None and fit is not None:
        on_train = linear_head(fit.first(n_targets + k), rank, n_targets)[0] if refit else net
        with torch.no_grad():
            lin_val = on_train.predict_expression(torch.as_tensor(features[val_idx], dtype=torch.float32)).numpy()
        weight, w_scores = choose_blend_weight(expr.batch(val_idx, n_targets), mlp_val, lin_val)
    search = {"weight": np.asarray(list(w_scores), dtype=float), "val_pcc": np.asarray(list(w_scores.values()))}
    return net, {**info, "k": int(k), "search": search_record(scores), "weight": weight, "weight_search": search}


def choose_blend_weight(
    y_val, mlp_val: np.ndarray, lin_val: np.ndarray, weights: Sequence[float] = consts.HYBRID_WEIGHTS
) -> tuple[float, dict]:
    """The share ``w`` of the linear head with the best validation mean target PCC of ``(1 - w) mlp + w lin``."""
    y_val = np.asarray(y_val, dtype=np.float64)
    scores = {float(w): mean_pearson(y_val, (1 - w) * np.asarray(mlp_val) + w * np.asarray(lin_val)) for w in weights}
    finite = {w: v for w, v in scores.items() if np.isfinite(v)}
    if not finite:
        return consts.HYBRID_LINEAR_WEIGHT, scores
    best = max(finite, key=lambda w: (finite[w], -abs(w - 0.5)))
    logg.info(f"head='hybrid': linear weight {best} (validation PCC {finite[best]:.4f})")
    return best, scores


def search_record(scores: dict) -> dict:
    """The validation scores of :func:`choose_rrr` as arrays ``k``, ``rank`` (-1: full rank) and ``val_pcc``."""
    return {
        "k": np.asarray([k for k, _ in scores], dtype=int),
        "rank": np.asarray([-1 if r is None else r for _, r in scores], dtype=int),
        "val_pcc": np.asarray(list(scores.values()), dtype=float),
    }


def choose_rrr(
    features: np.ndarray,
    expr,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    n_targets: int,
    ks: Sequence[int],
    ranks: Sequence[int | None] = RRR_RANKS,
) -> tuple[int, int | None, dict, RRRFit | None]:
    """The number of auxiliaries (of ``ks``) and the rank with the best validation mean target PCC.

    Also returns the fit on the training spots of the widest ``k`` (``None`` without validation spots): one pass over
    the spots serves every ``k``.
    """
    ks = sorted({int(k) for k in ks})
    if len(val_idx) < 2:
        return ks[-1], None, {}, None
    n_t = int(n_targets)
    fit = rrr_fit(features, expr, train_idx, n_t, n_cols=n_t + ks[-1])
    X_va, Y_va = features[val_idx], expr.batch(val_idx, n_t)
    scores: dict = {}
    for k in ks:
        fit_k = fit.first(n_t + k)
        for r in ranks:
            scores[(k, r)] = mean_pearson(Y_va, fit_k.predict(X_va, r, n_t)[0])
    k, r = max(scores, key=lambda kr: (scores[kr], -kr[0]))  # ties: fewer auxiliaries
    logg.info(f"head='rrr': k = {k}, rank = {r} (validation PCC {scores[(k, r)]:.4f})")
    return k, r, scores, fit
