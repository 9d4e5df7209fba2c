"""One trainer for both modes and all four methods (the Method page describes it)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from scanpy import logging as logg
from torch import nn

from agl_scverse import _constants as consts
from agl_scverse import _distributed as dist
from agl_scverse._legacy_keywords import TRAIN_NETWORK_KEYWORDS, TRAIN_NETWORK_RENAMED, merge_legacy
from agl_scverse._stats import StreamingMoments
from agl_scverse._utils import resolve_device
from agl_scverse._validate import MIN_BATCH_SPOTS
from agl_scverse.configs import DkGSBConfig, TrainingConfig, as_config

from ._bilevel import AdamState, hypergradient, meta_scope_names
from ._data import augment_codes, batch_stream
from ._loss import per_gene_loss, weighted_loss
from ._mask import GeneMask
from ._precision import resolve_precision
from ._targets import StandardizedTargets, TensorInputs, genes_for_method, predict_raw, val_pcc

__all__ = [
    "TensorInputs",
    "StandardizedTargets",
    "TrainResult",
    "genes_for_method",
    "train_network",
    "predict_raw",
    "val_pcc",
]


#: Largest float64 block (bytes) of spots x genes held while calibrating (a few such blocks exist at once).
_CALIBRATION_BYTES = 4 * 2**20


@dataclass
class TrainResult:
    """What :func:`train_network` returns besides the trained network (updated in place)."""

    history: dict = field(default_factory=dict)
    best_epoch: int = 0
    best_val_pcc: float = float("nan")
    theta: float | None = None
    k: int | None = None
    aux_weights: np.ndarray | None = None
    fit_seconds: float = 0.0
    meta_seconds: float = 0.0
    precision: dict = field(default_factory=dict)


#: Per-epoch records of :attr:`TrainResult.history`.
HISTORY_KEYS = ("epoch", "train_loss", "val_pcc", "k", "theta", "hypergrad", "meta_val_loss", "seconds")


def _early_stop(bad: int, bar: Any, hist: dict, best: tuple, limits: tuple[int, int], desc: str) -> bool:
    """Whether ``bad`` epochs reach the patience (``limits``: patience, epochs); if so, say so on the bar and log."""
    if bad < limits[0]:
        return False
    msg = (
        f"stopped early after {hist['epoch'][-1] + 1} of {limits[1]} epochs (no better val_pcc in {limits[0]}); "
        f"kept epoch {best[1]}, val_pcc {best[0]:.4f}"
    )
    if not bar.disable:  # the bar ends full at the epochs run
        bar.n = bar.total = hist["epoch"][-1] + 1 - getattr(bar.iterable, "start", 0)
        bar.set_postfix_str(msg)
    logg.info(f"{desc}: {msg}")
    return True


def empty_history() -> dict[str, list]:
    """A training history with no epoch yet (one list per :data:`HISTORY_KEYS` entry)."""
    return {key: [] for key in HISTORY_KEYS}


def _calibrate_(net: nn.Module, inputs: Callable, targets: StandardizedTargets, idx: np.ndarray, batch_size: int):
    """Fit the calibration buffers: per-gene least squares on the training spots and the training range to clip to.

    Per gene ``a = max(cov(out, y) / var(out), floor)`` with a tiny positive floor (the sign never flips, so
    correlations are kept), ``b = mean(y) - a mean(out)``, mapped back from z-scores; moments accumulated per batch.
    """
    moments = StreamingMoments(targets.n_cols, paired=True)
    lo, hi = np.full(targets.n_cols, np.inf), np.full(targets.n_cols, -np.inf)
    batch_size = max(1, min(batch_size, _CALIBRATION_BYTES // (8 * targets.n_cols)))  # float64 spots x genes
    for s in range(0, len(idx), batch_size):
        rows = idx[s : s + batch_size]
        out = predict_raw(net, inputs, rows, batch_size)
        yz = targets(rows).double().cpu().numpy()
        moments.update(out, yz)
        y_orig = yz * targets.std + targets.mean  # training expression in the transformed scale
        lo, hi = np.minimum(lo, y_orig.min(0)), np.maximum(hi, y_orig.max(0))
    om, ym, var, cov = moments.mean, moments.mean_b, moments.var, moments.cov
    sd = np.sqrt(np.maximum(var, 1e-24))
    a = np.where(var > 1e-24, np.maximum(cov / np.maximum(var, 1e-24), 1e-3 / sd), 0.0)
    b = ym - a * om
    with torch.no_grad():
        fitted = {"out_scale": a * targets.std, "out_shift": targets.mean + b * targets.std, "out_lo": lo, "out_hi": hi}
        for name, value in fitted.items():
            buf = net.get_buffer(name)
            buf.copy_(torch.as_tensor(value, dtype=buf.dtype))


def _loop_state(epoch, net, opt, mask, theta_opt, rng, hist, best, bad, meta_seconds, elapsed, scaler=None) -> dict:
    """Everything the loop carries between epochs (a checkpoint; the checkpointer adds the global RNG states)."""
    return {
        "epoch": int(epoch),
        "net": net.state_dict(),
        "opt": opt.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "theta": None if mask is None else mask.theta.detach().clone(),
        "theta_opt": None if theta_opt is None else theta_opt.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "history": hist,
        "best": {"pcc": float(best[0]), "epoch": int(best[1]), "net": best[2], "theta": best[3]},
        "bad": int(bad),
        "meta_seconds": float(meta_seconds),
        "elapsed": float(elapsed),
    }


def _record(hist: dict, epoch, losses, pcc, k_now, theta_now, hgs, mvl, seconds) -> None:
    """Append one epoch to the training history."""

    def mean(v: list) -> float:
        return float(np.mean(v)) if v else float("nan")

    values = (epoch, mean(losses), pcc, int(k_now), theta_now, mean(hgs), mean(mvl), seconds)
    for key, value in zip(HISTORY_KEYS, values):
        hist[key].append(value)


def _restore_loop_state(checkpoint, net, opt, mask, theta_opt, rng, hist, t0: float, scaler=None) -> tuple:
    """Load a checkpoint's :func:`_loop_state`; returns ``(first epoch, bad epochs, best, meta seconds, start)``."""
    from ._resume import set_rng_state

    if checkpoint is None or checkpoint.state is None:
        return 0, 0, (-np.inf, 0, None, None), 0.0, t0
    st = checkpoint.state
    net.load_state_dict(st["net"])
    opt.load_state_dict(st["opt"])
    if scaler is not None and st.get("scaler"):  # the precision is in the fingerprint: fp16 resumes fp16
        scaler.load_state_dict(st["scaler"])
    if mask is not None:
        with torch.no_grad():
            mask.theta.copy_(st["theta"])
        theta_opt.load_state_dict(st["theta_opt"])
    rng.bit_generator.state = st["numpy_rng"]
    set_rng_state(checkpoint.rank_rng())
    for key in hist:
        hist[key][:] = list(st["history"][key])
    b = st["best"]
    best = (b["pcc"], b["epoch"], b["net"], b["theta"])
    return int(st["epoch"]), int(st["bad"]), best, st["meta_seconds"], t0 - st["elapsed"]


def _meta_step(net, mask, opts, inputs, Yz, idx, n_targets, rng, m: DkGSBConfig, loss, clip, scope) -> tuple:
    """One DkGSB update of ``theta`` (meta batches, this rank's share of the hypergradient, one Adam step)."""
    (opt, theta_opt), (train_idx, val_idx) = opts, idx
    inner_steps, inner_lr = int(m.inner_steps or 0), cast(float, m.inner_lr)
    authors = m.lookahead == consts.LOOKAHEAD_AUTHORS  # one batch for all inner steps (the others: one per step)
    n_tr = min(m.meta_batch_size, len(train_idx))
    mtr = [dist.shard(rng.choice(train_idx, size=n_tr, replace=False)) for _ in range(1 if authors else inner_steps)]
    mva = dist.shard(rng.choice(val_idx, size=min(m.meta_batch_size, len(val_idx)), replace=False))
    live = AdamState.from_optimizer(opt, net) if m.lookahead == consts.LOOKAHEAD_ADAM else None  # "sgd": None
    state = AdamState.fresh(net, inner_lr) if authors else live
    g, lv = hypergradient(
        net, mask, n_targets, [inputs(i) for i in mtr], [Yz(i) for i in mtr], inputs(mva), Yz(mva),
        inner_steps=inner_steps, inner_lr=inner_lr, loss=loss, normalizer=m.meta_normalizer,
        optimizer_state=state, meta_scope=scope, train_mode=authors,
    )  # fmt: skip
    theta_opt.zero_grad(set_to_none=True)
    mask.theta.grad = g.clamp(-clip, clip).to(mask.theta.dtype)
    theta_opt.step()
    mask.clamp_()
    return float(g), lv


def _resolved_configs(training: Any, dkgsb: Any, legacy: dict[str, Any]) -> tuple[TrainingConfig, DkGSBConfig]:
    """``train_network``'s configs with 0.2.0's flat keywords moved in (a ``FutureWarning``), ``None`` fields resolved."""
    if legacy:
        given = {"training": training, "dkgsb": dkgsb}
        given = merge_legacy("train_network", given, legacy, 4, TRAIN_NETWORK_KEYWORDS, TRAIN_NETWORK_RENAMED)
        training, dkgsb = given["training"], given["dkgsb"]
    t = as_config(TrainingConfig, training, "training").resolved("embedding")  # None fields: the mode's defaults
    return t, as_config(DkGSBConfig, dkgsb, "dkgsb").resolved("embedding")


def train_network(
    net: nn.Module,
    inputs: Callable,
    Y,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    n_targets: int,
    *,
    training: TrainingConfig | Mapping[str, Any] | None = None,
    dkgsb: DkGSBConfig | Mapping[str, Any] | None = None,
    mask: GeneMask | None = None,
    aux_weights: np.ndarray | None = None,
    seed: int = 0,
    device: torch.device | str = "auto",
    progress: bool = True,
    desc: str = "agl",
    precision: consts.Precision = "fp32",
    checkpoint=None,
    clip: float = 1.0,
    theta_beta2: float = 0.9,
    **legacy: Any,
) -> TrainResult:
    """Train ``net`` in place; learn the DkGSB threshold when ``mask`` is given.

    Parameters
    ----------
    net
        :class:`~agl_scverse.model.EmbeddingHead` or :class:`~agl_scverse.model.FinetuneNet` with ``n_out`` equal
        to ``Y.shape[1]``; outputs ordered targets first.
    inputs
        Callable ``idx -> input batch tensor`` on ``device`` (e.g. :class:`TensorInputs`).
    Y
        Expression (targets first, then auxiliaries in prior-rank order): an ``(n_spots, n_genes)`` array or a
        batch source (:class:`StandardizedTargets`), standardised per gene on the training spots.
    train_idx
        Row positions of the training spots.
    val_idx
        Row positions of the validation spots (early stopping, DkGSB's meta batches).
    n_targets
        Number of leading target columns.
    training
        :class:`~agl_scverse.configs.TrainingConfig` (or a dict of its fields): epochs, patience, lr, weight decay,
        batch size, loss, ``augment`` (random flips / quarter turns of the training batches' patches, for image
        inputs with a ``stream`` method, drawn from ``(seed, epoch)`` only). Fields left at ``None`` take the
        embedding-mode defaults (:func:`agl_scverse.tl.agl_fit` resolves them for its mode first); ``refit``,
        ``n_seeds``, ``checkpoint_every`` and ``resume`` are ``agl_fit``'s and not read here. Without validation
        spots, exactly ``epochs`` epochs run and the last one is kept.
    dkgsb
        :class:`~agl_scverse.configs.DkGSBConfig` (or a dict): the bi-level step when ``mask`` is given (inner
        steps, meta steps per epoch spread over the training batches, meta batch size, ``beta`` the Adam lr on
        ``theta``, ``meta_normalizer``, ``lookahead``, ``meta_scope``; see :func:`agl_scverse.model.hypergradient`).
    mask
        The learnable :class:`~agl_scverse.model.GeneMask` over the auxiliary columns (DkGSB); ``None`` gives every
        gene weight 1 (PGL, AGL-all, top-k: the caller decides which columns enter) or ``aux_weights``.
    aux_weights
        Fixed loss weights of the auxiliary columns (without ``mask``), e.g. a learned DkGSB mask when refitting.
    seed
        Seeds batch order, meta batches, initialisation-independent randomness (dropout).
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``... or a :class:`torch.device`.
    progress
        Show a tqdm bar over epochs (postfix: loss, validation PCC, k).
    desc
        Label of that bar.
    precision
        How the network runs: ``"fp32"`` (default),
        ``"auto"``, ``"bf16"``, ``"fp16"`` (autocast of the forward passes, ``channels_last`` for convolutional
        networks, a gradient scaler with fp16). The loss and the DkGSB hypergradient are computed in float32.
    checkpoint
        The checkpointer of :func:`agl_scverse.tl.agl_fit` (``checkpoint_every``, ``resume``): training starts
        from its state when it has one, and the state is saved after every ``checkpoint.every`` epochs.
    clip
        DkGSB: hypergradient clipping.
    theta_beta2
        DkGSB: Adam's second-moment decay for ``theta``.
    **legacy
        Deprecated, removed in the next release: the flat keywords of release 0.2.0 (``epochs``, ``patience``,
        ``lr``, ``weight_decay``, ``batch_size``, ``loss``, ``augment``; ``inner_steps``, ``inner_lr``,
        ``meta_steps``, ``meta_batch_size``, ``beta``, ``normalizer``, ``lookahead``, ``meta_scope``) still work with
        a ``FutureWarning`` naming the new spelling: ``training=TrainingConfig(epochs=5)``,
        ``dkgsb=DkGSBConfig(meta_normalizer=...)`` for ``normalizer``. One given in its config too is a ``TypeError``.

    Returns
    -------
    :class:`TrainResult`; ``net`` (and ``mask.theta``) hold the best epoch's state, calibrated.

    Notes
    -----
    Under ``torchrun`` every rank draws the same batches and trains on its rank-strided share of each, in
    ``DistributedDataParallel``; the loss is that of the global batch, the hypergradient is averaged over the ranks,
    and torch's generator is seeded ``seed + rank``.

    Examples
    --------
    >>> import numpy as np
    >>> from agl_scverse.model import EmbeddingHead
    >>> rng = np.random.default_rng(0)
    >>> X, Y = rng.normal(size=(60, 8)), rng.normal(size=(60, 4))
    >>> net = EmbeddingHead(8, 4, hidden=(16,))
    >>> res = train_network(net, TensorInputs(X), Y, np.arange(40), np.arange(40, 60), 2, training={"epochs": 2},
    ...                     progress=False)
    >>> len(res.history["val_pcc"])
    2
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    t, m = _resolved_configs(training, dkgsb, legacy)
    epochs, batch_size, patience = cast(int, t.epochs), cast(int, t.batch_size), cast(int, t.patience)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    torch.manual_seed(seed + dist.rank())
    rng = np.random.default_rng(seed)
    train_idx = np.asarray(train_idx, dtype=np.int64)
    val_idx = np.asarray(val_idx, dtype=np.int64)
    scope = meta_scope_names(net, m.meta_scope) if mask is not None else None  # refuses a scope without signal
    if mask is not None and aux_weights is not None:
        raise ValueError("Pass either a learnable mask or fixed aux_weights, not both.")
    if mask is not None and not len(val_idx):
        raise ValueError("DkGSB learns its mask on validation spots; val_idx is empty.")
    if len(train_idx) < MIN_BATCH_SPOTS:
        raise ValueError(
            f"{len(train_idx)} training spot(s): training needs at least {MIN_BATCH_SPOTS} (the per-gene loss of a "
            "batch is a correlation over its spots). Use more spots or a smaller validation share."
        )
    dist.check_batch_size(batch_size)
    Yz = StandardizedTargets(Y, train_idx, device)  # z-scored batches, never the whole matrix
    net.to(device)
    prec = resolve_precision(precision, device, net, training=True)
    converted = prec.to_layout(net)  # before the optimiser: same parameter objects, new layout
    if mask is not None:
        mask.to(device)
    n_aux = int(mask.ranks.numel()) if mask is not None else 0
    if mask is not None and Yz.n_cols != n_targets + n_aux:
        raise ValueError("The mask must cover exactly the auxiliary columns of Y.")

    opt = torch.optim.Adam(net.parameters(), lr=cast(float, t.lr), weight_decay=t.weight_decay)
    # theta: a short second-moment memory, as the hypergradient shrinks while the network converges (Method page)
    theta_opt = torch.optim.Adam([mask.theta], lr=m.beta, betas=(0.9, theta_beta2)) if mask is not None else None
    ones = torch.ones(Yz.n_cols, device=device)
    if aux_weights is not None:
        aux_weights = np.asarray(aux_weights, dtype=np.float64)
        if aux_weights.shape != (Yz.n_cols - n_targets,) or not np.all(np.isfinite(aux_weights)):
            raise ValueError(f"aux_weights must be {Yz.n_cols - n_targets} finite weights (one per auxiliary column).")
        ones = torch.cat([ones[:n_targets], torch.as_tensor(aux_weights, dtype=ones.dtype, device=device)])

    hist = empty_history()
    n_batches = max(1, int(np.ceil(len(train_idx) / batch_size)))
    if n_batches > 1 and len(train_idx) - (n_batches - 1) * batch_size < MIN_BATCH_SPOTS:
        n_batches -= 1  # a last batch of one spot joins the one before it (the slice below runs to the end)
    start, bad, best, meta_seconds, t0 = _restore_loop_state(
        checkpoint, net, opt, mask, theta_opt, rng, hist, t0, prec.scaler
    )
    train_net, reduce = dist.wrap_ddp(net, device), dist.loss_reduce()  # the module and None alone
    bar = tqdm(range(start, epochs), desc=desc, disable=not progress or not dist.is_main(), leave=False)
    for epoch in bar:
        te = time.perf_counter()
        net.train()
        perm = rng.permutation(train_idx)
        n_meta = max(int(m.meta_steps or 0), 0) if mask is not None and epoch > 0 and n_aux > 0 else 0
        meta_after = np.floor((np.arange(n_meta) + 0.5) * n_batches / max(n_meta, 1)).astype(int)  # batch of each
        losses, hgs, mvl = [], [], []
        ends = [(b + 1) * batch_size if b < n_batches - 1 else len(perm) for b in range(n_batches)]
        batches = [dist.shard(perm[b * batch_size : e]) for b, e in enumerate(ends)]  # this rank's share
        codes = augment_codes(seed, epoch, len(perm)) if t.augment else None  # per position of the global batches
        if codes is not None:
            codes = np.concatenate([dist.shard(codes[b * batch_size : e]) for b, e in enumerate(ends)])
        for b, x in enumerate(batch_stream(inputs, batches, codes)):
            w = ones if mask is None else torch.cat([ones[:n_targets], mask.weights().detach()])
            with prec.autocast():
                out = train_net(prec.image_batch(x))
            L = weighted_loss(per_gene_loss(out.float(), Yz(batches[b]), t.loss, reduce=reduce), w)
            prec.backward_step(L, opt)
            losses.append(float(L.detach()))
            for _ in range(int(np.sum(meta_after == b))):
                tm = time.perf_counter()
                opts, idx = (opt, theta_opt), (train_idx, val_idx)
                g, lv = _meta_step(net, mask, opts, inputs, Yz, idx, n_targets, rng, m, t.loss, clip, scope)
                hgs.append(g)
                mvl.append(lv)
                meta_seconds += time.perf_counter() - tm
        with prec.autocast():
            pcc = val_pcc(net, inputs, Yz, val_idx, n_targets) if len(val_idx) else float("nan")
        n_aux_used = int((aux_weights > 0.5).sum()) if aux_weights is not None else Yz.n_cols - n_targets
        k_now = mask.k if mask is not None else n_aux_used  # a refit keeps the fit's selection
        theta_now = mask.threshold if mask is not None else float("nan")
        _record(hist, epoch, losses, pcc, k_now, theta_now, hgs, mvl, time.perf_counter() - te)
        shown = {"val_pcc": f"{pcc:.4f}"} if len(val_idx) else {}  # none in a refit
        bar.set_postfix({"loss": f"{hist['train_loss'][-1]:.4f}", **shown, "k": k_now})
        if not len(val_idx):  # no validation spots (a refit): train every epoch, keep the last
            best = (pcc, epoch, None, None)
        elif pcc > best[0] + 1e-6:
            theta_state = mask.theta.detach().clone() if mask is not None else None
            best = (pcc, epoch, copy.deepcopy(net.state_dict()), theta_state)
            bad = 0
        else:
            bad += 1
            if _early_stop(bad, bar, hist, best, (patience, epochs), desc):
                break
        if checkpoint is not None and epoch + 1 < epochs and checkpoint.due(epoch + 1):
            elapsed = time.perf_counter() - t0
            checkpoint.save(
                _loop_state(
                    epoch + 1, net, opt, mask, theta_opt, rng, hist, best, bad, meta_seconds, elapsed, prec.scaler
                )
            )
    bar.close()
    if not np.isfinite(hist["train_loss"]).any():
        raise RuntimeError(
            f"Training failed: the training loss was NaN/inf in all {len(hist['epoch'])} epoch(s), so the network "
            "learned nothing. Check the inputs for extreme values, or lower lr."
        )
    if best[2] is not None:
        net.load_state_dict(best[2])
        if mask is not None:
            with torch.no_grad():
                mask.theta.copy_(best[3])
    with prec.autocast():
        _calibrate_(net, inputs, Yz, train_idx, 512)
    prec.restore_layout(net, converted)
    net.eval()
    res = TrainResult(hist, int(best[1]), float(best[0]), meta_seconds=meta_seconds, precision=prec.record())
    if mask is not None:
        res.theta, res.k, res.aux_weights = mask.threshold, mask.k, mask.weights().detach().double().cpu().numpy()
    res.fit_seconds = time.perf_counter() - t0
    return res
