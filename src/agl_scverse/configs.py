"""Configuration objects of a fit: genes, network, training, DkGSB and the image encoder.

Frozen dataclasses that check their values when built; a plain ``dict`` of fields is accepted wherever a config
is. Fields left at ``None`` take the training mode's default (:data:`MODE_DEFAULTS`) in ``resolved(mode)``.

Examples
--------
>>> import agl_scverse as agl
>>> training = agl.TrainingConfig(epochs=20, n_seeds=1)
>>> training.resolved("embedding").lr
0.001
>>> agl.configs.as_config(agl.GeneConfig, {"n_targets": 20}).n_targets
20
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from agl_scverse import _constants as consts
from agl_scverse._validate import check_choice, check_in_range, check_min_batch_size, check_positive

__all__ = [
    "GeneConfig",
    "NetworkConfig",
    "TrainingConfig",
    "DkGSBConfig",
    "EncoderConfig",
    "as_config",
]

#: Defaults per training mode of the fields left at ``None`` (why: ``docs/method.md``).
_MODE_FIELDS: tuple[str, ...] = ("hidden", "epochs", "patience", "lr", "batch_size", "augment", "meta_scope")
_MODE_FIELDS += ("meta_steps", "refit", "n_seeds", "head")
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "embedding": dict(
        zip(_MODE_FIELDS, ((256,), 100, 10, 1e-3, 128, False, consts.META_SCOPE_ALL, 4, True, 5, consts.HEAD_HYBRID))
    ),
    "finetune": dict(zip(_MODE_FIELDS, ((), 50, 20, 3e-5, 128, True, consts.META_SCOPE_ALL, 1, False, 1, "mlp"))),
}

C = TypeVar("C")


def _mode_defaults(mode: str) -> dict[str, Any]:
    check_choice("mode", mode, consts.MODES)
    return MODE_DEFAULTS[mode]


def as_config(cls: type[C], value: C | Mapping[str, Any] | None, name: str | None = None) -> C:
    """``value`` as a ``cls``: ``None`` gives the defaults, a mapping its fields; a ``cls`` is returned as is."""
    name = name or cls.__name__
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cast(Any, cls))}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TypeError(f"{name}: {cls.__name__} has no field(s) {unknown}; its fields are {sorted(known)}.")
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__}, a dict of its fields or None, got {type(value).__name__}.")


def _flag(name: str, value: Any, allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def _names(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a list of gene names, e.g. {name}=['ERBB2'], got {value!r}.")
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class GeneConfig:
    """Which genes a fit predicts and learns from, and the expression scale (computed on training spots only).

    Parameters
    ----------
    n_targets
        Number of highly variable target genes (when ``targets`` is None).
    targets
        Explicit target genes.
    auxiliaries
        Explicit auxiliary genes (default: every other gene passing ``min_cells``).
    prior
        Ranking of the auxiliaries: ``"hvg"``, ``"coexpression"``, ``"moran"`` or a numeric ``.var`` column (see
        :func:`agl_scverse.pp.gene_roles`).
    min_cells
        A candidate gene has counts in at least this many training spots (or this fraction of them).
    transform
        Expression scale (``"log1p"``, ``"log1p_cpm"``, ``"none"``; :func:`agl_scverse.pp.expression_transform`).
    layer
        Layer holding raw counts instead of ``.X``.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> agl.GeneConfig(n_targets=20, prior="moran").n_targets
    20
    >>> agl.GeneConfig(targets=["ERBB2", "CD74"]).targets
    ('ERBB2', 'CD74')
    """

    n_targets: int = 50
    targets: Sequence[str] | None = None
    auxiliaries: Sequence[str] | None = None
    prior: consts.Prior | str = "hvg"
    min_cells: int | float = 10
    transform: consts.Transform = "log1p"
    layer: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _names("targets", self.targets))
        object.__setattr__(self, "auxiliaries", _names("auxiliaries", self.auxiliaries))
        check_choice("transform", self.transform, consts.TRANSFORMS)
        if not isinstance(self.prior, str) or not self.prior:
            raise TypeError(f"prior must be 'hvg', 'coexpression', 'moran' or a .var column name, got {self.prior!r}.")
        if self.targets is None:
            check_positive("n_targets", self.n_targets, integer=True)
        mc = self.min_cells
        if isinstance(mc, bool) or not isinstance(mc, int | float | np.number) or not np.isfinite(mc) or mc < 0:
            raise ValueError(f"min_cells must be a non-negative integer or a fraction in (0, 1), got {mc!r}.")
        if self.layer is not None and not isinstance(self.layer, str):
            raise TypeError(f"layer must be the name of a layer (a string) or None, got {self.layer!r}.")


@dataclass(frozen=True)
class NetworkConfig:
    """The network on top of the image features.

    Parameters
    ----------
    hidden
        Hidden widths of the embedding-mode MLP trunk (``None``: ``(256,)`` in embedding mode, none in fine-tune).
    dropout
        Dropout after each hidden layer.
    head
        Embedding mode: ``"hybrid"`` (the default: the MLP mixed with a closed-form reduced-rank ridge of the
        targets, its share chosen on the validation spots), ``"mlp"`` (MLP trunk and output layer only) or ``"rrr"``
        (the closed-form ridge alone, :func:`agl_scverse.tl.reduced_rank_ridge`; methods ``"pgl"``, ``"agl"``,
        ``"topk"``, one seed). Fine-tune mode: ``"mlp"`` (``None``: the mode's default).

    Examples
    --------
    >>> import agl_scverse as agl
    >>> agl.NetworkConfig(hidden=(128, 64)).resolved("embedding").hidden
    (128, 64)
    >>> agl.NetworkConfig().resolved("finetune").hidden
    ()
    >>> agl.NetworkConfig().resolved("embedding").head, agl.NetworkConfig().resolved("finetune").head
    ('hybrid', 'mlp')
    """

    hidden: Sequence[int] | None = None
    dropout: float = 0.1
    head: consts.Head | None = None

    def __post_init__(self) -> None:
        if self.head is not None:
            check_choice("head", self.head, consts.HEADS)
        if self.hidden is not None:
            h = self.hidden
            if isinstance(h, int | np.integer) or not isinstance(h, Sequence | np.ndarray) or isinstance(h, str):
                raise TypeError(f"hidden must be a sequence of layer widths, e.g. hidden=(256,), got {h!r}.")
            if any(isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1 for v in h):
                raise ValueError(f"hidden must be a sequence of positive integers, got {h!r}.")
            object.__setattr__(self, "hidden", tuple(int(v) for v in h))
        check_in_range("dropout", self.dropout, 0.0, 1.0, closed="left")

    def resolved(self, mode: consts.Mode) -> NetworkConfig:
        """A copy with the ``None`` fields set to the defaults of ``mode``."""
        dflt = _mode_defaults(mode)
        hidden = dflt["hidden"] if self.hidden is None else self.hidden
        return replace(self, hidden=hidden, head=dflt["head"] if self.head is None else self.head)


@dataclass(frozen=True)
class TrainingConfig:
    """How the network is trained: Adam, mini-batches, early stopping, refit, seed ensembles, checkpoints.

    Parameters
    ----------
    epochs
        Maximum number of epochs (``None``: 100 in embedding mode, 50 in fine-tune mode).
    patience
        Early stopping: epochs without a better validation mean target Pearson r (``None``: 10 / 20).
    lr
        Adam learning rate of the network (``None``: 1e-3 in embedding mode, 3e-5, the paper's, in fine-tune mode).
    weight_decay
        Adam weight decay.
    batch_size
        Spots per training batch (``None``: 128).
    loss
        ``"pearson"`` (``1 - r`` per gene, paper) or ``"mse"``.
    refit
        After early stopping, retrain on the training **and** validation spots for the selected number of epochs
        (validation metrics are the first fit's). ``None``: ``True`` in embedding mode, ``False`` in fine-tune mode.
    n_seeds
        Embedding mode: average this many networks (seeds ``seed, seed + 1, ...``, one split). ``None``: 5 in
        embedding mode, 1 in fine-tune mode and with ``head="rrr"``.
    augment
        Fine-tune mode: seeded random flips and quarter turns of the training patches (``None``: on in fine-tune
        mode, off in embedding mode, where ``True`` is an error).
    checkpoint_every
        Write a training checkpoint every this many epochs beside ``save_dir`` (0: none; see :doc:`/scaling_out`).
    resume
        Continue the run whose checkpoint is beside ``save_dir`` (same settings); without one, start afresh.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> t = agl.TrainingConfig(epochs=30, n_seeds=1).resolved("embedding")
    >>> t.epochs, t.lr, t.refit, t.n_seeds
    (30, 0.001, True, 1)
    """

    epochs: int | None = None
    patience: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    batch_size: int | None = None
    loss: consts.Loss = "pearson"
    refit: bool | None = None
    n_seeds: int | None = None
    augment: bool | None = None
    checkpoint_every: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "batch_size", "n_seeds"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name), integer=True)
        if self.batch_size is not None:
            check_min_batch_size(self.batch_size)
        if self.lr is not None:
            check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_choice("loss", self.loss, consts.LOSSES)
        object.__setattr__(self, "refit", _flag("refit", self.refit))
        object.__setattr__(self, "augment", _flag("augment", self.augment))
        object.__setattr__(self, "resume", _flag("resume", self.resume, allow_none=False))
        check_positive("checkpoint_every", self.checkpoint_every, integer=True, allow_zero=True)

    def resolved(self, mode: consts.Mode, head: consts.Head | None = None) -> TrainingConfig:
        """A copy with the ``None`` fields set to the defaults of ``mode`` (one seed for ``head="rrr"``)."""
        dflt = _mode_defaults(mode)
        new = {
            n: dflt[n]
            for n in ("epochs", "patience", "lr", "batch_size", "refit", "augment")
            if getattr(self, n) is None
        }
        if self.n_seeds is None:  # the closed-form head is the same for every seed: one
            new["n_seeds"] = 1 if head == consts.HEAD_RRR else dflt["n_seeds"]
        return replace(self, **new) if new else self

    def record(self) -> dict[str, Any]:
        """The hyperparameters (every field but ``checkpoint_every`` and ``resume``, which do not change a run)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("checkpoint_every", "resume")}


@dataclass(frozen=True)
class DkGSBConfig:
    """The auxiliary-gene selection: DkGSB's bi-level step, and the number of auxiliaries of ``method="topk"``.

    Parameters
    ----------
    inner_steps
        Differentiable inner steps ``H`` of the look-ahead (``None``: 12 for ``lookahead="authors"``, else 1).
    inner_lr
        The inner steps' learning rate with ``lookahead="sgd"`` (``None``: 0.1) or ``"authors"`` (``None``: 3e-5);
        ``"adam"`` uses the network's own.
    meta_steps
        Updates of the threshold per epoch (``None``: 4 in embedding mode, 1 in fine-tune mode).
    meta_batch_size
        Spots per meta batch.
    tau
        Mask temperature.
    beta
        Adam learning rate on the threshold.
    meta_normalizer
        ``"soft"`` (the exact derivative through the weighted loss's ``sum(w)``) or ``"detached"`` (``sum(w)``
        held constant, the authors' code). See the Method page.
    lookahead
        ``"adam"`` (the network's live Adam step), ``"sgd"`` (SGD with ``inner_lr``, the paper's equation) or
        ``"authors"`` (a copy of the network and a fresh Adam on one meta batch, the authors' code).
    meta_scope
        The parameters the look-ahead moves: ``"all"``, ``"last"`` (see
        :func:`agl_scverse.model.meta_scope_names`) or ``"auto"`` (the mode's).
    k
        ``method="topk"``: the number of auxiliaries (by prior), or ``"auto"`` (chosen over ``k_grid`` on the
        validation spots).
    k_grid
        Numbers of auxiliaries tried by ``k="auto"`` (default: :func:`agl_scverse.tl.k_search_grid`).

    Examples
    --------
    >>> import agl_scverse as agl
    >>> d = agl.DkGSBConfig(lookahead="authors").resolved("finetune")
    >>> d.inner_steps, d.inner_lr, d.meta_steps, d.meta_scope
    (12, 3e-05, 1, 'all')
    >>> agl.DkGSBConfig(k="auto", k_grid=[0, 100]).k_grid
    (0, 100)
    """

    inner_steps: int | None = None
    inner_lr: float | None = None
    meta_steps: int | None = None
    meta_batch_size: int = 128
    tau: float = 0.01
    beta: float = 0.01
    meta_normalizer: consts.MetaNormalizer = "soft"
    lookahead: consts.Lookahead = "adam"
    meta_scope: consts.MetaScope | consts.Auto = consts.META_SCOPE_AUTO
    k: int | consts.Auto | None = None
    k_grid: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.inner_steps is not None:
            check_positive("inner_steps", self.inner_steps, integer=True)
        if self.meta_steps is not None:
            check_positive("meta_steps", self.meta_steps, integer=True, allow_zero=True)
        check_positive("meta_batch_size", self.meta_batch_size, integer=True)
        for name in ("inner_lr", "tau", "beta"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        check_choice("meta_normalizer", self.meta_normalizer, consts.META_NORMALIZERS)
        check_choice("lookahead", self.lookahead, consts.LOOKAHEADS)
        check_choice("meta_scope", self.meta_scope, (consts.META_SCOPE_AUTO, *consts.META_SCOPES))
        if self.k is not None and self.k != consts.K_AUTO:
            check_positive("k", self.k, integer=True, allow_zero=True)
        if self.k_grid is not None:
            if self.k != consts.K_AUTO:
                raise ValueError("k_grid applies to method='topk' with k='auto' only.")
            grid = self.k_grid
            if isinstance(grid, str | int | np.integer):
                raise TypeError(
                    f"k_grid must list the numbers of auxiliary genes to try, e.g. (0, 300, 1000), got {grid!r}."
                )
            if not len(grid):
                raise ValueError("k_grid is empty; give the numbers of auxiliary genes to try, e.g. (0, 300, 1000).")
            for v in grid:
                check_positive("k_grid value", v, integer=True, allow_zero=True)
            object.__setattr__(self, "k_grid", tuple(int(v) for v in grid))

    def resolved(self, mode: consts.Mode) -> DkGSBConfig:
        """A copy with ``None`` / ``"auto"`` fields set to the defaults of ``mode`` and of the look-ahead."""
        dflt = _mode_defaults(mode)
        new: dict[str, Any] = {}
        if self.meta_scope == consts.META_SCOPE_AUTO:
            new["meta_scope"] = dflt["meta_scope"]
        if self.meta_steps is None:
            new["meta_steps"] = dflt["meta_steps"]
        if self.inner_steps is None:
            new["inner_steps"] = consts.INNER_STEPS_DEFAULTS[self.lookahead]
        if self.inner_lr is None:
            new["inner_lr"] = consts.INNER_LR_DEFAULTS[self.lookahead]
        return replace(self, **new) if new else self


@dataclass(frozen=True)
class EncoderConfig:
    """The image encoder and how patches are cut and run through it: embedding, fine-tuning and predicting.

    Parameters
    ----------
    encoder
        Encoder name (a preset such as ``"uni"``, an ``"hf-hub:..."`` or timm name; see
        :func:`agl_scverse.model.get_encoder`), or (for embedding) a module / callable.
    weights
        Local state-dict file of the encoder (see :func:`agl_scverse.model.load_weights`); its sha256 is recorded.
    encoder_kwargs
        Keyword arguments of ``timm.create_model`` for the encoder (recorded in the model).
    pretrained
        The published weights from the local cache, else the hub (when ``weights`` is None).
    strict
        Load ``weights`` strictly (every tensor must fit).
    patch_px
        Patch side in pixels given to the encoder.
    patch_um
        Patch side in µm on the slide.
    precision
        How the encoder runs: ``"auto"`` (bf16 or fp16 autocast where the device runs it natively, else float32),
        ``"fp32"``, ``"bf16"`` or ``"fp16"``; features are stored as float32. In fine-tune mode, also the forward
        passes of training (losses and the hypergradient stay float32).
    backend
        What runs a frozen encoder: ``"auto"`` (ONNX Runtime on a CPU at float32 when installed and in agreement
        with torch, else torch), ``"torch"`` or ``"onnx"``. Fine-tuning uses torch.
    batch_size
        Patches per encoder batch when embedding.
    num_workers
        DataLoader worker processes cutting patches (same results with any number).
    prefetch_factor
        Batches each worker prepares ahead.
    allow_lowres
        Cut patches from an image coarser than the patches (see :class:`~agl_scverse.pp.SpotPatches`).
    tta
        Test-time augmentation of embeddings: ``False``, ``True`` (8 dihedral views) or 4 / 8 views.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> enc = agl.EncoderConfig("densenet121", patch_um=160.0, num_workers=2)
    >>> enc.encoder, enc.patch_px, enc.patch_um
    ('densenet121', 224, 160.0)
    """

    encoder: Any = "resnet18"
    weights: str | Path | None = None
    encoder_kwargs: Mapping[str, Any] | None = None
    pretrained: bool = False
    strict: bool = True
    patch_px: int = consts.DEFAULT_PATCH_PX
    patch_um: float = consts.DEFAULT_PATCH_UM
    precision: consts.Precision = "auto"
    backend: consts.Backend = "auto"
    batch_size: int = 32
    num_workers: int = 0
    prefetch_factor: int = 2
    allow_lowres: bool = False
    tta: bool | int = False

    def __post_init__(self) -> None:
        if isinstance(self.encoder, str) and not self.encoder:
            raise ValueError("encoder is empty; name an encoder, e.g. 'resnet18', 'densenet121' or 'uni'.")
        if self.encoder is None:
            raise TypeError("encoder must be a name such as 'resnet18' (or a module), got None.")
        if self.weights is not None and not isinstance(self.weights, str | Path):
            raise TypeError(f"weights must be a path to a weights file or None, got {type(self.weights).__name__}.")
        if self.encoder_kwargs is not None and not isinstance(self.encoder_kwargs, Mapping):
            raise TypeError(
                f"encoder_kwargs must be a dict of timm.create_model arguments, got {self.encoder_kwargs!r}."
            )
        for name in ("pretrained", "strict", "allow_lowres"):
            object.__setattr__(self, name, _flag(name, getattr(self, name), allow_none=False))
        check_positive("patch_px", self.patch_px, integer=True)
        check_positive("patch_um", self.patch_um)
        check_choice("precision", self.precision, consts.PRECISIONS)
        check_choice("backend", self.backend, consts.BACKENDS)
        check_positive("batch_size", self.batch_size, integer=True)
        check_positive("num_workers", self.num_workers, integer=True, allow_zero=True)
        check_positive("prefetch_factor", self.prefetch_factor, integer=True)
        if not isinstance(self.tta, bool | int | np.integer):
            raise ValueError(f"tta must be False, True (8 views) or a number of views (4 or 8), got {self.tta!r}.")


#: The config arguments of ``agl_fit`` and friends, and the class each takes.
CONFIG_ARGUMENTS: dict[str, type] = {
    "genes": GeneConfig, "network": NetworkConfig, "training": TrainingConfig, "dkgsb": DkGSBConfig,
    "encoder": EncoderConfig,
}  # fmt: skip


def changed_fields(config: Any) -> dict[str, Any]:
    """The fields a caller set: a dict's keys, or a config object's fields that differ from its class defaults."""
    if config is None or isinstance(config, Mapping):
        return dict(config or {})
    default = type(config)()
    return {
        f.name: getattr(config, f.name) for f in fields(config) if getattr(config, f.name) != getattr(default, f.name)
    }


def explicit_fields(encoder: Any) -> dict[str, Any]:
    """:func:`changed_fields` of an encoder argument; a bare encoder (a name, module...) is its ``encoder`` field."""
    if encoder is None or isinstance(encoder, EncoderConfig | Mapping):
        return changed_fields(encoder)
    return {"encoder": encoder}


def as_encoder_config(encoder: Any) -> EncoderConfig:
    """An encoder argument (a config, a dict of its fields, None or a bare encoder) as an :class:`EncoderConfig`."""
    if encoder is None or isinstance(encoder, EncoderConfig | Mapping):
        return as_config(EncoderConfig, encoder, "encoder")
    return EncoderConfig(encoder=encoder)
