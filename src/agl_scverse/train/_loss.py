"""Per-gene losses (``1 - Pearson`` or MSE), optionally all-reduced over ranks, and the mask-weighted mean."""

from __future__ import annotations

from collections.abc import Callable

import torch

from agl_scverse import _constants as consts
from agl_scverse._validate import check_choice

__all__ = ["pearson_loss", "mse_loss", "per_gene_loss", "weighted_loss"]


Reduce = Callable[[torch.Tensor], torch.Tensor]


def pearson_loss(
    pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8, reduce: Reduce | None = None
) -> torch.Tensor:
    """``1 - Pearson r`` (in ``[0, 2]``) of every gene (column) over the spots (rows) of the batch, ``(n_genes,)``.

    Parameters
    ----------
    pred
        Predictions, an ``(n_spots, n_genes)`` tensor.
    target
        Observed values, same shape.
    eps
        Added to the variances: a gene constant in the batch gives ``r = 0`` (loss 1), not NaN.
    reduce
        Sums a tensor over the processes sharing the batch, with gradients (under ``torchrun``); None: all here.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(8, 3)
    >>> pearson_loss(x, 2 * x + 1).abs().max() < 1e-5
    tensor(True)
    """
    if reduce is None:
        p = pred - pred.mean(dim=0, keepdim=True)
        t = target - target.mean(dim=0, keepdim=True)
        cov = (p * t).sum(dim=0)
        denom = torch.sqrt((p * p).sum(dim=0) + eps) * torch.sqrt((t * t).sum(dim=0) + eps)
        return 1.0 - cov / denom
    target = target.to(pred.dtype)
    n = pred.new_full((1, pred.shape[1]), float(pred.shape[0]))
    n, sp, st = reduce(torch.cat([n, pred.sum(0, keepdim=True), target.sum(0, keepdim=True)])).unbind(0)
    n = n.clamp_min(1.0)
    p, t = pred - sp / n, target - st / n
    cov, spp, stt = reduce(torch.stack([(p * t).sum(0), (p * p).sum(0), (t * t).sum(0)])).unbind(0)
    return 1.0 - cov / (torch.sqrt(spp + eps) * torch.sqrt(stt + eps))


def mse_loss(pred: torch.Tensor, target: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    """Mean squared error for every gene (column) over the spots of the batch (``reduce``: see :func:`pearson_loss`)."""
    if reduce is None:
        return ((pred - target) ** 2).mean(dim=0)
    n = pred.new_full((1, pred.shape[1]), float(pred.shape[0]))
    n, sq = reduce(torch.cat([n, ((pred - target) ** 2).sum(0, keepdim=True)])).unbind(0)
    return sq / n.clamp_min(1.0)


def per_gene_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "pearson", reduce: Reduce | None = None
) -> torch.Tensor:
    """:func:`pearson_loss` or :func:`mse_loss` (``kind``: ``"pearson"`` or ``"mse"``; ``reduce``: see there).

    Examples
    --------
    >>> import torch
    >>> per_gene_loss(torch.zeros(4, 2), torch.ones(4, 2), "mse").shape
    torch.Size([2])
    """
    check_choice("loss", kind, consts.LOSSES)
    if kind == "pearson":
        return pearson_loss(pred, target, reduce=reduce)
    return mse_loss(pred, target, reduce=reduce)


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i L_i / sum_i w_i``: the mask-weighted mean of per-gene losses.

    Examples
    --------
    >>> import torch
    >>> weighted_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.0]))
    tensor(1.)
    """
    return (weights * losses).sum() / weights.sum().clamp_min(1e-12)
