"""What an ``agl_fit`` run is configured with: the configs of :mod:`agl_scverse.configs`, checked together."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

from agl_scverse import _constants as consts
from agl_scverse._validate import check_choice, check_seed
from agl_scverse.configs import (
    CONFIG_ARGUMENTS,
    DkGSBConfig,
    EncoderConfig,
    GeneConfig,
    NetworkConfig,
    TrainingConfig,
    as_config,
    changed_fields,
)

__all__ = ["FitConfig", "CONFIG_ARGUMENTS", "merge_configs"]


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides how an ``agl_fit`` run trains (recorded as ``params``)."""

    method: consts.Method
    mode: consts.Mode
    network: NetworkConfig
    training: TrainingConfig
    dkgsb: DkGSBConfig
    genes: GeneConfig
    encoder: EncoderConfig
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("method", self.method, consts.METHODS)
        check_choice("mode", self.mode, consts.MODES)
        if self.mode == "embedding" and self.training.augment:
            raise ValueError(
                "augment=True applies to mode='finetune' (it flips and rotates image patches); embedding mode trains "
                "on cached features. Leave TrainingConfig(augment=None) (or False) in embedding mode."
            )
        if self.network.head == consts.HEAD_RRR:
            bad = (
                "mode='finetune'" if self.mode != "embedding"
                else f"method={self.method!r}" if self.method == "dkgsb"
                else f"n_seeds={self.training.n_seeds}" if self.n_seeds > 1 else None
            )  # fmt: skip
            if bad:
                raise ValueError(
                    f"head='rrr' (a closed-form ridge fit on cached features) does not apply with {bad}: it takes "
                    "mode='embedding', method 'pgl', 'agl' or 'topk' (k='auto' searches k) and one seed. Use "
                    "head='mlp' for DkGSB, fine-tuning or ensembles."
                )
        if self.network.head == consts.HEAD_HYBRID and self.mode != "embedding":
            raise ValueError(
                "head='hybrid' (the MLP and a closed-form ridge on cached features) applies to mode='embedding'. "
                "Use head='mlp' in fine-tune mode."
            )
        if self.mode == "finetune" and self.n_seeds > 1:
            raise ValueError(
                f"n_seeds={self.training.n_seeds} applies to mode='embedding' (an ensemble of heads on the same "
                "features); in fine-tune mode it would train that many encoders. Use TrainingConfig(n_seeds=1), or fit "
                "the models separately."
            )
        if self.method == "topk" and self.k is None:
            raise ValueError(
                "method='topk' needs k, the number of auxiliary genes to use (e.g. dkgsb=agl.DkGSBConfig(k=500)), "
                "or k='auto' to choose it on the validation spots."
            )
        check_seed(self.seed)

    @classmethod
    def build(
        cls,
        method: consts.Method,
        mode: consts.Mode,
        *,
        genes: GeneConfig | Mapping[str, Any] | None = None,
        network: NetworkConfig | Mapping[str, Any] | None = None,
        training: TrainingConfig | Mapping[str, Any] | None = None,
        dkgsb: DkGSBConfig | Mapping[str, Any] | None = None,
        encoder: EncoderConfig | Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> FitConfig:
        """The configs (dicts accepted) with their ``None`` fields resolved for ``mode``, checked together."""
        check_choice("mode", mode, consts.MODES)
        network = as_config(NetworkConfig, network, "network").resolved(mode)
        return cls(
            method=method,
            mode=mode,
            network=network,
            training=as_config(TrainingConfig, training, "training").resolved(mode, network.head),
            dkgsb=as_config(DkGSBConfig, dkgsb, "dkgsb").resolved(mode),
            genes=as_config(GeneConfig, genes, "genes"),
            encoder=as_config(EncoderConfig, encoder, "encoder"),
            seed=seed,
        )

    @property
    def k(self) -> int | str | None:
        """``method="topk"``'s number of auxiliaries (or ``"auto"``)."""
        return self.dkgsb.k

    @property
    def top_k(self) -> int | None:
        """``method="topk"``'s number of auxiliaries; None for ``"auto"`` or unset."""
        k = self.dkgsb.k
        return None if k is None or isinstance(k, str) else int(k)

    @property
    def n_seeds(self) -> int:
        """Networks averaged (``TrainingConfig.n_seeds``, 1 where unset)."""
        return int(self.training.n_seeds or 1)

    @property
    def k_grid(self) -> tuple[int, ...] | None:
        """The numbers of auxiliaries ``k="auto"`` tries."""
        grid = self.dkgsb.k_grid
        return None if grid is None else tuple(grid)

    @property
    def precision(self) -> consts.Precision:
        """How the network runs in training: the encoder's precision in fine-tune mode, float32 on features."""
        return self.encoder.precision if self.mode == "finetune" else "fp32"

    def to_params(self, genes: bool = True) -> dict[str, Any]:
        """A flat record of every setting, named as the config fields they came from."""
        out: dict[str, Any] = {"method": self.method, "mode": self.mode, "k": self.k, "seed": self.seed}
        if (grid := self.k_grid) is not None:
            out["k_grid"] = list(grid)
        out.update(asdict(self.network))
        out.update(self.training.record())
        out["precision"] = self.encoder.precision
        out.update({n: v for n, v in asdict(self.dkgsb).items() if n not in ("k", "k_grid")})
        if genes:
            out.update(asdict(self.genes))
        out["hidden"] = list(self.network.hidden or ())
        return out


def merge_configs(shared: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """``agl_fit`` arguments ``shared`` by several fits, updated by one fit's ``own``.

    A config argument (``genes``, ``network``, ``training``, ``dkgsb``, ``encoder``) given as a config object or a
    dict on both sides is merged field by field: ``own``'s fields win, ``shared``'s others are kept. ``own``'s
    fields are a dict's keys, or a config object's fields that differ from the class defaults (to set a field back
    to its default, give a dict). The result is a config object where ``shared`` gave one, else a dict. Any other
    argument (an encoder given by name, ``device``, ...) is replaced by ``own``'s, as ``{**shared, **own}``.
    """
    out = {**shared, **own}
    for name, cls in CONFIG_ARGUMENTS.items():
        base: Any = shared.get(name)
        top: Any = own.get(name)
        if not (isinstance(base, cls | Mapping) and isinstance(top, cls | Mapping)):
            continue
        as_config(cls, top, name)  # names a wrong field clearly
        given = changed_fields(top)
        out[name] = {**base, **given} if isinstance(base, Mapping) else replace(cast(Any, base), **given)
    return out
