"""Deprecated flat keywords (``epochs=5``) moved into the configs that now hold them, for one release."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from agl_scverse.configs import (
    CONFIG_ARGUMENTS,
    DkGSBConfig,
    EncoderConfig,
    GeneConfig,
    NetworkConfig,
    TrainingConfig,
    changed_fields,
)

__all__ = ["LEGACY_KEYWORDS", "TRAIN_NETWORK_KEYWORDS", "TRAIN_NETWORK_RENAMED", "merge_legacy"]

#: The flat keywords of agl_fit before the configs (deprecated), and the config each now belongs to.
LEGACY_KEYWORDS: dict[str, tuple[str, type]] = {
    **dict.fromkeys(("n_targets", "targets", "auxiliaries", "prior", "min_cells", "transform", "layer"), ("genes", GeneConfig)),
    **dict.fromkeys(("hidden", "dropout", "head"), ("network", NetworkConfig)),
    **dict.fromkeys(("epochs", "patience", "lr", "weight_decay", "batch_size", "loss", "refit", "n_seeds", "augment", "checkpoint_every", "resume"), ("training", TrainingConfig)),
    **dict.fromkeys(("inner_steps", "inner_lr", "meta_steps", "meta_batch_size", "tau", "beta", "meta_normalizer", "lookahead", "meta_scope", "k", "k_grid"), ("dkgsb", DkGSBConfig)),
    **dict.fromkeys(("weights", "encoder_kwargs", "patch_px", "patch_um", "precision", "backend", "num_workers", "prefetch_factor", "allow_lowres"), ("encoder", EncoderConfig)),
}  # fmt: skip

#: The flat keywords of ``train_network`` in release 0.2.0 (deprecated), and the config each now belongs to.
TRAIN_NETWORK_KEYWORDS: dict[str, tuple[str, type]] = {
    **dict.fromkeys(("epochs", "patience", "lr", "weight_decay", "batch_size", "loss", "augment"), ("training", TrainingConfig)),
    **dict.fromkeys(("inner_steps", "inner_lr", "meta_steps", "meta_batch_size", "beta", "normalizer", "lookahead", "meta_scope"), ("dkgsb", DkGSBConfig)),
}  # fmt: skip

#: Those of ``train_network``'s keywords whose config field has another name.
TRAIN_NETWORK_RENAMED: dict[str, str] = {"normalizer": "meta_normalizer"}


def merge_legacy(
    func: str,
    configs: dict[str, Any],
    legacy: dict[str, Any],
    stacklevel: int = 3,
    keywords: Mapping[str, tuple[str, type]] = LEGACY_KEYWORDS,
    renamed: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The configs of ``func`` with its deprecated flat keywords (``epochs=5``) moved into them.

    ``configs`` maps ``func``'s config arguments (``"training"``...) to what the caller gave (a config, a dict or
    None); ``keywords`` maps each old keyword to its config argument and class, and ``renamed`` an old keyword to
    its field where the names differ. An old keyword of no argument in ``configs``, or one given in its config
    too, is a ``TypeError``; the others warn once (``FutureWarning``), naming the new spelling.
    """
    out = dict(configs)
    renamed = renamed or {}
    enc = out.get("encoder")
    enc_name = enc is not None and not isinstance(enc, EncoderConfig | Mapping)  # a name (or module): old spelling
    if enc_name:
        out["encoder"] = {"encoder": enc}
    unknown = [n for n in legacy if n not in keywords or keywords[n][0] not in out]
    if unknown:
        raise TypeError(f"{func}() got an unexpected keyword argument {unknown[0]!r}.")
    by_param: dict[str, list[str]] = {"encoder": []} if enc_name else {}
    for name, value in legacy.items():
        param, field = keywords[name][0], renamed.get(name, name)
        given: Any = out.get(param)
        as_dict = given is None or isinstance(given, Mapping)
        if field in (dict(given or {}) if as_dict else changed_fields(given)):
            as_field = "" if field == name else f" (as {field})"
            raise TypeError(
                f"{func}(): {name} is given twice, as {name}= and in {param}=; give it in {param}= only{as_field}."
            )
        out[param] = {**dict(given or {}), field: value} if as_dict else replace(given, **{field: value})
        by_param.setdefault(param, []).append(field)
    if by_param:
        hints = []
        for param, names in by_param.items():
            args = [f"{n}=..." for n in names]
            if param == "encoder" and enc_name:
                args.insert(0, repr(enc) if isinstance(enc, str) else "encoder=...")
            hints.append(f"{param}=agl.{CONFIG_ARGUMENTS[param].__name__}({', '.join(args)})")
        old = [f"{n}=" for n in legacy] + (["encoder=<a name>"] if enc_name else [])
        warnings.warn(
            f"{func}({', '.join(old)}) is deprecated and will be removed in the next release: use {', '.join(hints)}.",
            FutureWarning,
            stacklevel=stacklevel,
        )
    return out
