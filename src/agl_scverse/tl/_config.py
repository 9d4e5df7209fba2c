"""What an ``agl_fit`` run is configured with: network, training, DkGSB and gene choices, checked in one place.

Per-mode defaults live here (:data:`MODE_DEFAULTS`); ``None`` arguments of :func:`agl_scverse.tl.agl_fit` take
them. Each configuration checks its own values when it is built and turns into the ``params`` record of
``.uns[key_added]`` and the model config with :func:`dataclasses.asdict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agl_scverse import _constants as K
from agl_scverse._validate import check_choice, check_in_range, check_min_batch_size, check_positive, check_seed

__all__ = ["MODE_DEFAULTS", "NetworkConfig", "TrainingConfig", "DkGSBConfig", "GeneConfig", "FitConfig"]

#: Defaults of the network and trainer per mode. Embedding mode: a one-hidden-layer MLP (256 units, dropout 0.1)
#: with Adam lr 1e-3 converges in tens of epochs on cached features; the paper's 3e-5 is for fine-tuning a
#: ResNet18 end to end, kept for ``mode="finetune"``, whose at most 50 epochs (patience 20) are our budget for a GPU
#: job, not the paper's (the authors' code allows up to 1,000 epochs with early stopping). Fine-tune mode flips and quarter-turns its training patches
#: by default (``augment``); embedding mode trains on cached features, which cannot be augmented. The DkGSB
#: look-ahead (``meta_scope``) moves every parameter in both modes: the cheaper ``"last"`` scope of fine-tune mode
#: measured 3.5x cheaper per meta step, but its hypergradient was mostly the normaliser's step-size term, not the
#: auxiliaries' effect (``benchmarks/bench_finetune.py --meta``; see the Method page), so it is opt-in. Fine-tune
#: mode takes one meta step per epoch (``meta_steps``): four made a DkGSB epoch 3.1x an AGL-all epoch, one 1.4x.
#: Embedding mode refits on training + validation spots after early stopping (``refit``) and averages five seeds
#: (``n_seeds``): on HER2+ leave-one-section-out each lifted every network by about +0.01 mean PCC, and on the
#: synthetic slide refit +0.09 and the ensemble +0.03 to +0.05 more (a demo fit 1.2-5.7 s instead of 1.0-3.5 s;
#: ``benchmarks/RESULTS.md``, docs/method.md). Fine-tune mode trains one encoder without refit: neither was
#: measured there and each would multiply a GPU job.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "embedding": {"hidden": (256,), "epochs": 100, "patience": 10, "lr": 1e-3, "batch_size": 128, "augment": False,
                  "meta_scope": K.META_SCOPE_ALL, "meta_steps": 4, "refit": True, "n_seeds": 5},
    "finetune": {"hidden": (), "epochs": 50, "patience": 20, "lr": 3e-5, "batch_size": 128, "augment": True,
                 "meta_scope": K.META_SCOPE_ALL, "meta_steps": 1, "refit": False, "n_seeds": 1},
}  # fmt: skip


@dataclass(frozen=True)
class NetworkConfig:
    """The head: hidden widths of the embedding-mode MLP trunk and its dropout, or the closed-form linear head."""

    hidden: tuple[int, ...]
    dropout: float = 0.1
    head: str = "mlp"

    def __post_init__(self) -> None:
        check_choice("head", self.head, K.HEADS)
        if any(isinstance(h, bool) or not isinstance(h, int | np.integer) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a sequence of positive integers, got {self.hidden!r}.")
        check_in_range("dropout", self.dropout, 0.0, 1.0, closed="left")


@dataclass(frozen=True)
class TrainingConfig:
    """Adam on the network, mini-batches, early stopping on the validation mean target Pearson r.

    ``augment``: random flips / quarter turns of the training patches (fine-tune mode); ``precision``: how the
    encoder runs (fine-tune training, and embedding a slide whose features are missing); ``n_seeds``: networks
    trained from successive seeds and averaged (embedding mode).
    """

    epochs: int
    patience: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    loss: str = "pearson"
    refit: bool = False
    augment: bool = False
    precision: str = "auto"
    n_seeds: int = 1

    def __post_init__(self) -> None:
        check_positive("n_seeds", self.n_seeds, integer=True)
        if not isinstance(self.refit, bool | np.bool_):
            raise TypeError(f"refit must be True or False, got {self.refit!r}.")
        for name in ("epochs", "patience", "batch_size"):
            check_positive(name, getattr(self, name), integer=True)
        check_min_batch_size(self.batch_size)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_choice("loss", self.loss, K.LOSSES)
        if not isinstance(self.augment, bool):
            raise TypeError(f"augment must be True or False, got {self.augment!r}.")
        check_choice("precision", self.precision, K.PRECISIONS)


@dataclass(frozen=True)
class DkGSBConfig:
    """The bi-level step: inner steps, meta steps per epoch, meta batch, mask temperature, lr on theta, objective.

    ``meta_scope``: the parameters the look-ahead moves (``"all"`` or ``"last"``; ``agl_fit``'s ``"auto"`` is
    resolved to the mode's default before this is built).
    """

    inner_steps: int = 1
    inner_lr: float = 0.1
    meta_steps: int = 4
    meta_batch_size: int = 128
    tau: float = 0.01
    beta: float = 0.01
    meta_normalizer: str = "soft"
    lookahead: str = "adam"
    meta_scope: str = K.META_SCOPE_ALL

    def __post_init__(self) -> None:
        check_positive("inner_steps", self.inner_steps, integer=True)
        check_positive("meta_steps", self.meta_steps, integer=True, allow_zero=True)
        check_positive("meta_batch_size", self.meta_batch_size, integer=True)
        for name in ("inner_lr", "tau", "beta"):
            check_positive(name, getattr(self, name))
        check_choice("meta_normalizer", self.meta_normalizer, K.META_NORMALIZERS)
        check_choice("lookahead", self.lookahead, K.LOOKAHEADS)
        check_choice("meta_scope", self.meta_scope, K.META_SCOPES)


@dataclass(frozen=True)
class GeneConfig:
    """Gene roles (computed on training spots only) and the expression scale."""

    n_targets: int = 50
    targets: tuple[str, ...] | None = None
    auxiliaries: tuple[str, ...] | None = None
    prior: str = "hvg"
    min_cells: int | float = 10
    transform: str = "log1p"
    layer: str | None = None

    def __post_init__(self) -> None:
        check_choice("transform", self.transform, K.TRANSFORMS)
        if self.targets is None:
            check_positive("n_targets", self.n_targets, integer=True)
        mc = self.min_cells
        if isinstance(mc, bool) or not isinstance(mc, int | float | np.number) or not np.isfinite(mc) or mc < 0:
            raise ValueError(f"min_cells must be a non-negative integer or a fraction in (0, 1), got {mc!r}.")


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides how an ``agl_fit`` run trains (recorded as ``params``)."""

    method: str
    mode: str
    network: NetworkConfig
    training: TrainingConfig
    dkgsb: DkGSBConfig
    genes: GeneConfig
    k: int | str | None = None
    k_grid: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("method", self.method, K.METHODS)
        check_choice("mode", self.mode, K.MODES)
        if self.mode == "embedding" and self.training.augment:
            raise ValueError(
                "augment=True applies to mode='finetune' (it flips and rotates image patches); embedding mode trains "
                "on cached features. Leave augment=None (or False) in embedding mode."
            )
        if self.network.head == K.HEAD_RRR:
            bad = (
                "mode='finetune'" if self.mode != "embedding"
                else f"method={self.method!r}" if self.method == "dkgsb"
                else f"n_seeds={self.training.n_seeds}" if self.training.n_seeds > 1 else None
            )  # fmt: skip
            if bad:
                raise ValueError(
                    f"head='rrr' (a closed-form ridge fit on cached features) does not apply with {bad}: it takes "
                    "mode='embedding', method 'pgl', 'agl' or 'topk' (k='auto' searches k) and one seed. Use "
                    "head='mlp' for DkGSB, fine-tuning or ensembles."
                )
        if self.network.head == K.HEAD_HYBRID and self.mode != "embedding":
            raise ValueError(
                "head='hybrid' (the MLP and a closed-form ridge on cached features) applies to mode='embedding'. "
                "Use head='mlp' in fine-tune mode."
            )
        if self.mode == "finetune" and self.training.n_seeds > 1:
            raise ValueError(
                f"n_seeds={self.training.n_seeds} applies to mode='embedding' (an ensemble of heads on the same "
                "features); in fine-tune mode it would train that many encoders. Use n_seeds=1, or fit the models "
                "separately."
            )
        if self.method == "topk":
            if self.k is None:
                raise ValueError(
                    "method='topk' needs k, the number of auxiliary genes to use (e.g. k=500), or k='auto' to "
                    "choose it on the validation spots."
                )
            if self.k != K.K_AUTO:
                check_positive("k", self.k, integer=True, allow_zero=True)
        if self.k_grid is not None:
            if self.k != K.K_AUTO:
                raise ValueError("k_grid applies to method='topk' with k='auto' only.")
            if not len(self.k_grid):
                raise ValueError("k_grid is empty; give the numbers of auxiliary genes to try, e.g. (0, 300, 1000).")
            for v in self.k_grid:
                check_positive("k_grid value", v, integer=True, allow_zero=True)
        check_seed(self.seed)

    @classmethod
    def build(
        cls,
        method: str,
        mode: str,
        *,
        hidden: Sequence[int] | None,
        dropout: float,
        epochs: int | None,
        patience: int | None,
        lr: float | None,
        batch_size: int | None,
        weight_decay: float,
        loss: str,
        genes: GeneConfig,
        k: int | str | None,
        augment: bool | None = None,
        precision: str = "auto",
        seed: int,
        refit: bool | None = None,
        k_grid: Sequence[int] | None = None,
        n_seeds: int | None = None,
        head: str = "mlp",
        **dkgsb: Any,
    ) -> FitConfig:
        """Fill ``None`` values from :data:`MODE_DEFAULTS` of ``mode`` and check everything."""
        check_choice("mode", mode, K.MODES)
        dflt = MODE_DEFAULTS[mode]

        def pick(name: str, value: Any) -> Any:
            return dflt[name] if value is None else value

        scope = dkgsb.pop("meta_scope", K.META_SCOPE_AUTO)
        check_choice("meta_scope", scope, (K.META_SCOPE_AUTO, *K.META_SCOPES))
        dkgsb["meta_scope"] = dflt["meta_scope"] if scope == K.META_SCOPE_AUTO else scope
        if dkgsb.get("meta_steps") is None:
            dkgsb["meta_steps"] = dflt["meta_steps"]
        look = dkgsb.get("lookahead", K.LOOKAHEAD_ADAM)
        check_choice("lookahead", look, K.LOOKAHEADS)
        if dkgsb.get("inner_steps") is None:  # the look-ahead's own: 12 for the authors', 1 otherwise
            dkgsb["inner_steps"] = K.INNER_STEPS_DEFAULTS[look]
        if dkgsb.get("inner_lr") is None:  # 3e-5 for the authors' fresh Adam, 0.1 for SGD (unused by "adam")
            dkgsb["inner_lr"] = K.INNER_LR_DEFAULTS[look]
        if n_seeds is None:  # the closed-form head is the same for every seed: one
            n_seeds = 1 if head == K.HEAD_RRR else dflt["n_seeds"]

        return cls(
            method=method,
            mode=mode,
            network=NetworkConfig(hidden=_as_widths(pick("hidden", hidden)), dropout=dropout, head=head),
            training=TrainingConfig(
                epochs=pick("epochs", epochs),
                patience=pick("patience", patience),
                lr=pick("lr", lr),
                batch_size=pick("batch_size", batch_size),
                weight_decay=weight_decay,
                loss=loss,
                refit=_as_flag(pick("refit", refit)),
                augment=_as_flag(pick("augment", augment)),
                precision=precision,
                n_seeds=n_seeds,
            ),
            dkgsb=DkGSBConfig(**dkgsb),
            genes=genes,
            k=k,
            k_grid=None if k_grid is None else tuple(int(v) for v in k_grid),
            seed=seed,
        )

    def to_params(self, genes: bool = True) -> dict[str, Any]:
        """A flat record of every setting, named as the ``agl_fit`` arguments they came from.

        ``genes=False`` leaves out the gene choices (the training hyperparameters only).
        """
        out: dict[str, Any] = {"method": self.method, "mode": self.mode, "k": self.k, "seed": self.seed}
        if self.k_grid is not None:
            out["k_grid"] = list(self.k_grid)
        for part in (self.network, self.training, self.dkgsb) + ((self.genes,) if genes else ()):
            out.update(asdict(part))
        out["hidden"] = list(self.network.hidden)
        return out


def _as_flag(value: Any) -> Any:
    """NumPy booleans as Python ones (anything else is left for the config to refuse)."""
    return bool(value) if isinstance(value, bool | np.bool_) else value


def _as_widths(hidden: Any) -> tuple:
    """``hidden`` as a tuple of widths; a single integer is refused with the fix (``(16,)``)."""
    if isinstance(hidden, int | np.integer) or not isinstance(hidden, Sequence) or isinstance(hidden, str):
        raise TypeError(f"hidden must be a sequence of layer widths, e.g. hidden=(256,), got {hidden!r}.")
    return tuple(hidden)
