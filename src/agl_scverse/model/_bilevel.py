"""The DkGSB bi-level step, written with :mod:`torch.func` (no ``higher``).

One meta step, for a train batch ``(x_tr, y_tr)`` and a validation batch ``(x_va, y_va)``:

1. copy the network parameters ``phi`` (detached: the real network is not touched);
2. take ``H`` differentiable SGD steps ``phi <- phi - alpha * grad_phi L_w(phi)`` on the train batch, where
   ``L_w = sum_i w_i(theta) L_i / sum_i w_i`` is the mask-weighted loss (``create_graph=True`` keeps the graph);
3. evaluate the *target-only* loss ``L_val(phi_H)`` on the validation batch (only the target rows of the output
   layer are computed);
4. ``dL_val / dtheta`` by back-propagating through the unrolled steps.

With ``H = 1`` this is the classic "learning to reweight" hypergradient: ``-alpha / sum w * sum_i w_i'(theta)
<grad L_val(phi_1), grad L_i(phi) - grad L_w(phi)>`` -- an auxiliary gene near the threshold is pulled in when its
gradient agrees with the targets' validation gradient better than the current mixture does.

Meta objective (``normalizer``). The paper's weighted loss ``sum_i w_i L_i / sum_i w_i`` is used unchanged to
train the network. Differentiated through ``sum_i w_i`` as well (``normalizer="soft"``), the one-step
hypergradient gains a pure step-size term: more auxiliaries shrink the targets' share of the inner step, so the
target loss after one step is higher, whatever the auxiliaries are. That term always pushes ``theta`` down (our
reading of the "k = 0" folds of a first re-implementation); on the synthetic slide the "soft" hypergradients were
2-10x larger than the "detached" ones, always positive. The default ``normalizer="detached"`` holds
``sum_i w_i`` constant inside the meta step, leaving ``-alpha / sum w * sum_i w_i'(theta) <grad L_val,
grad L_i>``: genes at the threshold are pulled in when their gradients agree with the targets' validation
gradient and pushed out when they disagree (its sign did change between seeds and epochs). It reduces the bias,
it does not remove every drift: with a large ``beta = 0.03`` both objectives still reached ``k = 0`` on the
synthetic slide. Both are exact derivatives of their objective (finite-difference tests in
``tests/test_bilevel.py``).

Choices that keep it cheap and stable (measured in ``benchmarks/bench_synthetic_methods.py``):

- the meta step runs the network in ``eval`` mode (no dropout noise in the hypergradient, deterministic);
- the validation loss only evaluates the target rows of the output layer, and with ``H = 1`` the auxiliary rows
  of the output layer enter the inner step as constants (exactly the same hypergradient, a cheaper graph);
- the trainer bounds the number of meta steps per epoch (``meta_steps``) and uses Adam with a short
  second-moment memory on ``theta`` -- see :mod:`agl_scverse.model.trainer`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from agl_scverse import _distributed as dist

from ._loss import per_gene_loss, weighted_loss
from ._mask import GeneMask

__all__ = ["unrolled_val_loss", "hypergradient"]


def _full_weights(mask: GeneMask, n_targets: int) -> torch.Tensor:
    w_aux = mask.weights()
    return torch.cat([torch.ones(n_targets, dtype=w_aux.dtype, device=w_aux.device), w_aux])


def unrolled_val_loss(
    net: nn.Module,
    mask: GeneMask,
    n_targets: int,
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_va: torch.Tensor,
    y_va: torch.Tensor,
    *,
    inner_steps: int = 1,
    inner_lr: float = 0.1,
    loss: str = "pearson",
    normalizer: str | float = "detached",
) -> torch.Tensor:
    """Target-only validation loss after ``inner_steps`` differentiable SGD steps on the mask-weighted train loss.

    The result is a scalar that depends on ``mask.theta`` through the unrolled steps (and on nothing else that
    requires a gradient). ``net`` must return the raw outputs for all genes and accept ``n_first=`` to return only
    the first ``n_first`` (targets).

    Examples
    --------
    >>> import torch
    >>> from agl_scverse.model import EmbeddingHead, GeneMask
    >>> net, mask = EmbeddingHead(4, 3, hidden=(5,)), GeneMask(torch.tensor([0.0, 1.0]))
    >>> x, y = torch.randn(6, 4), torch.randn(6, 3)
    >>> unrolled_val_loss(net, mask, 1, x, y, x, y).requires_grad
    True
    """
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    # With one inner step the auxiliary rows of the output layer cannot influence the target validation loss
    # (they only feed the auxiliary outputs), so they enter as constants: exact, and it skips the largest
    # weight gradient of the double backward. With H > 1 they feed later trunk gradients, so all rows are fast.
    split = int(inner_steps) == 1 and "out.weight" in params and "out.bias" in params
    const: dict[str, torch.Tensor] = {}
    fast: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        if split and name in ("out.weight", "out.bias"):
            fast[name] = p[:n_targets].detach().requires_grad_(True)
            const[name] = p[n_targets:].detach()
        else:
            fast[name] = p.detach().requires_grad_(True)

    def assemble(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        full = {n: (torch.cat([f[n], const[n]]) if n in const else f[n]) for n in f}
        return {**full, **buffers}

    w = _full_weights(mask, n_targets).to(y_tr.dtype)
    for _ in range(int(inner_steps)):
        out = functional_call(net, assemble(fast), (x_tr,))
        if isinstance(normalizer, int | float) and not isinstance(normalizer, bool):
            L = (w * per_gene_loss(out, y_tr, loss)).sum() / float(normalizer)
        elif normalizer == "detached":
            L = (w * per_gene_loss(out, y_tr, loss)).sum() / w.detach().sum().clamp_min(1e-12)
        elif normalizer == "soft":
            L = weighted_loss(per_gene_loss(out, y_tr, loss), w)
        else:
            raise ValueError(f"normalizer must be 'detached' or 'soft', got {normalizer!r}.")
        names = list(fast)
        grads = torch.autograd.grad(L, [fast[n] for n in names], create_graph=True, allow_unused=True)
        fast = {n: (fast[n] if g is None else fast[n] - inner_lr * g) for n, g in zip(names, grads)}
    out_va = functional_call(net, assemble(fast), (x_va,), {"n_first": n_targets})
    return per_gene_loss(out_va, y_va[:, :n_targets], loss).mean()


def hypergradient(
    net: nn.Module,
    mask: GeneMask,
    n_targets: int,
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_va: torch.Tensor,
    y_va: torch.Tensor,
    *,
    inner_steps: int = 1,
    inner_lr: float = 0.1,
    loss: str = "pearson",
    normalizer: str = "detached",
) -> tuple[torch.Tensor, float]:
    """``dL_val/dtheta`` of one meta step and the validation loss it was computed at.

    The network is put in ``eval`` mode for the step (and restored afterwards); nothing in ``net`` changes.

    Returns
    -------
    The hypergradient (a 0-d tensor, detached) and the target-only validation loss (float); under ``torchrun``
    both are the mean over the ranks, each of which computed them on its share of the meta batches.

    Examples
    --------
    >>> import torch
    >>> from agl_scverse.model import EmbeddingHead, GeneMask
    >>> net, mask = EmbeddingHead(4, 3, hidden=(5,)), GeneMask(torch.tensor([0.0, 1.0]))
    >>> x, y = torch.randn(6, 4), torch.randn(6, 3)
    >>> g, lv = hypergradient(net, mask, 1, x, y, x, y)
    >>> g.shape
    torch.Size([])
    """
    was_training = net.training
    net.eval()
    try:
        lv = unrolled_val_loss(
            net,
            mask,
            n_targets,
            x_tr,
            y_tr,
            x_va,
            y_va,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            loss=loss,
            normalizer=normalizer,
        )
        (g,) = torch.autograd.grad(lv, mask.theta)
    finally:
        net.train(was_training)
    # Under torchrun each rank holds a share of the meta batches: average over ranks, so theta stays identical.
    g_lv = dist.mean_(torch.stack([g.detach(), lv.detach().to(g.dtype)]))
    return g_lv[0], float(g_lv[1])
