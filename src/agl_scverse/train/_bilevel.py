"""The DkGSB bi-level step with :mod:`torch.func` (the Method page describes it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from agl_scverse import _constants as consts
from agl_scverse import _distributed as dist
from agl_scverse._validate import check_choice

from ._loss import per_gene_loss, weighted_loss
from ._mask import GeneMask

__all__ = ["AdamState", "meta_scope_names", "unrolled_val_loss", "hypergradient"]

#: Modules whose children are a sequence of blocks: the walk of :func:`meta_scope_names` enters them.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: Normalisation layers: a final norm after the last block (DenseNet's ``norm5``, a ViT's ``norm``) joins the scope.
_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())  # fmt: skip
_OUT = ("out.weight", "out.bias")


@dataclass
class AdamState:
    """A detached snapshot of a :class:`torch.optim.Adam` optimiser (one parameter group), to step functionally.

    Attributes
    ----------
    lr, betas, eps, weight_decay, step
        The optimiser's settings and the steps it has taken.
    exp_avg, exp_avg_sq
        First and second moment estimates per parameter name (zeros for parameters without state).

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> AdamState.from_optimizer(torch.optim.Adam(net.parameters(), lr=0.01), net).step
    0
    """

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    step: int
    exp_avg: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_optimizer(cls, opt: torch.optim.Optimizer, net: nn.Module) -> AdamState:
        """Snapshot ``opt`` (an Adam over ``net.parameters()``, one parameter group)."""
        if not isinstance(opt, torch.optim.Adam) or len(opt.param_groups) != 1:
            raise TypeError("AdamState needs a torch.optim.Adam with one parameter group.")
        grp = opt.param_groups[0]
        if grp.get("amsgrad") or grp.get("maximize") or grp.get("decoupled_weight_decay"):
            raise ValueError("AdamState follows plain Adam (no amsgrad / maximize / decoupled weight decay).")
        m, v, steps = {}, {}, set()
        for name, p in net.named_parameters():
            st = opt.state.get(p, {})
            m[name] = st["exp_avg"].detach() if "exp_avg" in st else torch.zeros_like(p.detach())
            v[name] = st["exp_avg_sq"].detach() if "exp_avg_sq" in st else torch.zeros_like(p.detach())
            steps.add(int(st["step"]) if "step" in st else 0)
        return cls(
            lr=float(grp["lr"]), betas=(float(grp["betas"][0]), float(grp["betas"][1])), eps=float(grp["eps"]),
            weight_decay=float(grp["weight_decay"]), step=max(steps) if steps else 0, exp_avg=m, exp_avg_sq=v,
        )  # fmt: skip

    @classmethod
    def fresh(cls, net: nn.Module, lr: float = 3e-5) -> AdamState:
        """A new :class:`torch.optim.Adam` over ``net`` (zero moments, step 0): the authors' inner optimiser."""
        return cls.from_optimizer(torch.optim.Adam(net.parameters(), lr=lr), net)


def _holds_parameters(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _last_block(root: nn.Module, skip: tuple[str, ...] = ()) -> list[nn.Module]:
    """The modules of the last block of ``root`` (see :func:`meta_scope_names`), without its children ``skip``."""
    picked: list[nn.Module] = []
    m, first = root, True
    while True:
        kids = [c for n, c in m.named_children() if n not in (skip if first else ()) and _holds_parameters(c)]
        own = next(m.parameters(recurse=False), None) is not None
        if not kids:  # a leaf (or a body without parameters below the output layer)
            return picked + ([m] if own else [])
        if not (first or isinstance(m, _CONTAINERS) or (len(kids) == 1 and not own)):
            return picked + [m]  # the first module that is neither a container nor a wrapper: the block
        while kids and isinstance(kids[-1], _NORMS):  # trailing normalisation layers join the scope
            picked.append(kids.pop())
        if not kids:
            return picked
        m, first = kids[-1], False


def meta_scope_names(net: nn.Module, meta_scope: str | Sequence[str] = "all") -> list[str]:
    """Names of the parameters of ``net`` that the DkGSB look-ahead moves (the others stay constant in it).

    ``"last"``: the output layer ``out`` and the last block below it (of ``net.backbone`` when there is one): the
    last child holding parameters, entering containers and single-child wrappers, plus the normalisation layers
    passed on the way (a ResNet's ``layer4.1``, a DenseNet's last dense layer and ``norm5``, a ViT's last block and
    ``norm``, an MLP head's last hidden ``Linear``).

    Parameters
    ----------
    net
        The network (with a linear output layer ``out`` for ``"last"``).
    meta_scope
        ``"all"``, ``"last"`` or a sequence of parameter names.

    Returns
    -------
    The names, in the order of ``net.named_parameters()``.

    Raises
    ------
    ValueError
        An unknown scope or names, or a scope of the output layer alone (its hypergradient says nothing about the
        auxiliaries).

    Examples
    --------
    >>> from agl_scverse.model import EmbeddingHead
    >>> meta_scope_names(EmbeddingHead(4, 3, hidden=(5, 6)), "last")
    ['trunk.3.weight', 'trunk.3.bias', 'out.weight', 'out.bias']
    """
    named = dict(net.named_parameters())
    if isinstance(meta_scope, str):
        check_choice("meta_scope", meta_scope, consts.META_SCOPES)
        if meta_scope == consts.META_SCOPE_ALL:
            return list(named)
        if not all(n in named for n in _OUT):
            raise ValueError("meta_scope='last' needs a network with a linear output layer `out`; use 'all'.")
        body = getattr(net, "backbone", None)
        blocks = _last_block(body) if isinstance(body, nn.Module) else _last_block(net, skip=("out",))
        ids = {id(p) for b in blocks for p in b.parameters()} | {id(named[n]) for n in _OUT}
        chosen = {n for n, p in named.items() if id(p) in ids}
    else:
        chosen = set(meta_scope)
        unknown = sorted(chosen - set(named))
        if unknown or not chosen:
            raise ValueError(f"meta_scope names {unknown or '(none)'} are not parameters of the network.")
    if chosen <= set(_OUT):
        raise ValueError(
            f"meta_scope={meta_scope!r} moves only the output layer of this network: with a linear output layer "
            "the auxiliary rows feed only the auxiliary outputs, so the hypergradient would say nothing about the "
            "auxiliary genes (it is exactly zero with a fixed normaliser). Include shared parameters "
            "(meta_scope='all', or a network with hidden layers / a backbone)."
        )
    return [n for n in named if n in chosen]


def _batches(x, y) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if torch.is_tensor(x):
        return [(x, y)]
    if len(x) != len(y) or not len(x):
        raise ValueError("x_tr and y_tr must be tensors or equally long, non-empty sequences of batches.")
    return list(zip(x, y))


def _train_loss(out, y, w, loss: str, normalizer) -> torch.Tensor:
    per_gene = per_gene_loss(out, y, loss)
    if isinstance(normalizer, int | float) and not isinstance(normalizer, bool):
        return (w * per_gene).sum() / float(normalizer)
    if normalizer == "detached":
        return (w * per_gene).sum() / w.detach().sum().clamp_min(1e-12)
    if normalizer == "soft":
        return weighted_loss(per_gene, w)
    raise ValueError(f"normalizer must be 'soft', 'detached' or a number, got {normalizer!r}.")


def unrolled_val_loss(
    net: nn.Module,
    mask: GeneMask,
    n_targets: int,
    x_tr: torch.Tensor | Sequence[torch.Tensor],
    y_tr: torch.Tensor | Sequence[torch.Tensor],
    x_va: torch.Tensor,
    y_va: torch.Tensor,
    *,
    inner_steps: int = 1,
    inner_lr: float = 0.1,
    loss: str = "pearson",
    normalizer: str | float = "soft",
    optimizer_state: AdamState | None = None,
    meta_scope: str | Sequence[str] = "all",
) -> torch.Tensor:
    """Target-only validation loss after ``inner_steps`` differentiable steps on the mask-weighted train loss.

    Parameters
    ----------
    net
        The network, in the mode it should be evaluated in.
    mask
        The soft mask over the auxiliary outputs.
    n_targets
        Number of leading target outputs.
    x_tr
        Inputs of one training batch, or a sequence of batches for the inner steps in turn.
    y_tr
        Their (standardised) expression.
    x_va
        Inputs of the validation batch.
    y_va
        Its expression (only the first ``n_targets`` columns are used).
    inner_steps
        Number of unrolled steps ``H``.
    inner_lr
        Learning rate of SGD inner steps (ignored with ``optimizer_state``).
    loss
        ``"pearson"`` or ``"mse"``.
    normalizer
        ``"soft"`` differentiates ``sum_i w_i`` too; ``"detached"`` (the authors') holds it constant in the
        derivative; a number replaces it.
    optimizer_state
        Take the inner steps as this Adam optimiser (:class:`AdamState`) would; ``None``: SGD.
    meta_scope
        The parameters the inner steps move: ``"all"``, ``"last"`` or names (:func:`meta_scope_names`).

    Examples
    --------
    >>> import torch
    >>> from agl_scverse.model import EmbeddingHead, GeneMask
    >>> net, mask, x = EmbeddingHead(4, 3, hidden=(5,)), GeneMask(torch.tensor([0.0, 1.0])), torch.randn(6, 4)
    >>> unrolled_val_loss(net, mask, 1, x, x[:, :3], x, x[:, :3]).requires_grad
    True
    """
    names = meta_scope_names(net, meta_scope)
    return _lookahead_loss(
        net, mask, n_targets, _batches(x_tr, y_tr), x_va, y_va, names, inner_steps=int(inner_steps),
        inner_lr=inner_lr, loss=loss, normalizer=normalizer, optimizer_state=optimizer_state,
    )  # fmt: skip


def _lookahead_loss(
    net, mask, n_targets, batches, x_va, y_va, names, *, inner_steps, inner_lr, loss, normalizer, optimizer_state
) -> torch.Tensor:
    """:func:`unrolled_val_loss` with the moved parameters named (``names``; every other one is a constant)."""
    params = dict(net.named_parameters())
    # in train mode, normalisation layers update their running statistics in place: the look-ahead gets copies
    buffers = {n: (b.clone() if net.training else b) for n, b in net.named_buffers()}
    # H = 1: the auxiliary rows of the output layer only feed the auxiliary outputs, so they enter as constants
    # (exact, and the double backward skips its largest weight gradient); with H > 1 they feed later steps.
    split = inner_steps == 1 and all(n in names for n in _OUT)

    def head(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[:n_targets] if split and name in _OUT else t

    # constants of the look-ahead: the parameters outside the scope (detached, so autograd builds no graph through
    # the layers that use only them) and, with one inner step, the auxiliary rows of the output layer
    const = {n: p.detach() for n, p in params.items() if n not in names}
    rows = {n: params[n][n_targets:].detach() for n in _OUT if split}
    fast = {n: head(n, params[n]).detach().requires_grad_(True) for n in names}
    st = optimizer_state
    if st is not None:
        m = {n: head(n, st.exp_avg[n]) for n in fast}
        v = {n: head(n, st.exp_avg_sq[n]) for n in fast}

    def assemble(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        full = {n: (torch.cat([f[n], rows[n]]) if n in rows else f[n]) for n in f}
        return {**const, **full, **buffers}

    w_aux = mask.weights()
    w = torch.cat([torch.ones(n_targets, dtype=w_aux.dtype, device=w_aux.device), w_aux]).to(batches[0][1].dtype)
    for h in range(inner_steps):
        xb, yb = batches[h % len(batches)]
        out = functional_call(net, assemble(fast), (xb,))
        L = _train_loss(out, yb, w, loss, normalizer)
        grads = torch.autograd.grad(L, [fast[n] for n in names], create_graph=True, allow_unused=True)
        new = {}
        for n, g in zip(names, grads):
            if st is None:
                new[n] = fast[n] if g is None else fast[n] - inner_lr * g
                continue
            g = torch.zeros_like(fast[n]) if g is None else g
            if st.weight_decay:
                g = g + st.weight_decay * fast[n]
            b1, b2 = st.betas
            t = st.step + h + 1
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            denom = (v[n] / (1 - b2**t)).clamp_min(1e-30).sqrt() + st.eps  # clamp: finite derivative at v = 0
            new[n] = fast[n] - st.lr * (m[n] / (1 - b1**t)) / denom
        fast = new
    out_va = functional_call(net, assemble(fast), (x_va,), {"n_first": n_targets})
    return per_gene_loss(out_va, y_va[:, :n_targets], loss).mean()


def hypergradient(
    net: nn.Module,
    mask: GeneMask,
    n_targets: int,
    x_tr: torch.Tensor | Sequence[torch.Tensor],
    y_tr: torch.Tensor | Sequence[torch.Tensor],
    x_va: torch.Tensor,
    y_va: torch.Tensor,
    *,
    inner_steps: int = 1,
    inner_lr: float = 0.1,
    loss: str = "pearson",
    normalizer: str | float = "soft",
    optimizer_state: AdamState | None = None,
    meta_scope: str | Sequence[str] = "all",
    train_mode: bool = False,
) -> tuple[torch.Tensor, float]:
    """``dL_val/dtheta`` of one meta step (:func:`unrolled_val_loss`) and the validation loss it was computed at.

    The network runs in ``eval`` mode (``train_mode=True``: train mode on copies of the running statistics, the
    authors' look-ahead) and is restored afterwards; the other arguments are those of :func:`unrolled_val_loss`.

    Returns
    -------
    The hypergradient (a detached 0-d tensor) and the target-only validation loss (float); under ``torchrun`` both
    are the mean over the ranks (each computed them on its share of the meta batches).

    Examples
    --------
    >>> import torch
    >>> from agl_scverse.model import EmbeddingHead, GeneMask
    >>> net, mask, x = EmbeddingHead(4, 3, hidden=(5,)), GeneMask(torch.tensor([0.0, 1.0])), torch.randn(6, 4)
    >>> hypergradient(net, mask, 1, x, x[:, :3], x, x[:, :3])[0].shape
    torch.Size([])
    """
    was_training = net.training
    net.train(bool(train_mode))
    try:
        lv = unrolled_val_loss(
            net, mask, n_targets, x_tr, y_tr, x_va, y_va, inner_steps=inner_steps, inner_lr=inner_lr, loss=loss,
            normalizer=normalizer, optimizer_state=optimizer_state, meta_scope=meta_scope,
        )  # fmt: skip
        (g,) = torch.autograd.grad(lv, mask.theta)
    finally:
        net.train(was_training)
    # Under torchrun each rank holds a share of the meta batches: average over ranks, so theta stays identical.
    g_lv = dist.mean_(torch.stack([g.detach(), lv.detach().to(g.dtype)]))
    return g_lv[0], float(g_lv[1])
