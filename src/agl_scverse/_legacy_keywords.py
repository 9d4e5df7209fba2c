"""Deprecated flat keywords (``epochs=5``, ``embed_patches(patch_px=32)``) moved into their configs, for one release."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
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

__all__ = ["EMBED_KEYWORDS", "LEGACY_KEYWORDS", "PREDICT_KEYWORDS", "TRAIN_NETWORK_KEYWORDS", "TRAIN_NETWORK_RENAMED"]
__all__ += ["encoder_keywords", "merge_legacy"]

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

#: The old keywords of ``embed_patches`` and of the predict functions, now fields of their ``encoder=``.
EMBED_KEYWORDS = tuple(f.name for f in fields(EncoderConfig) if f.name != "encoder")
PREDICT_KEYWORDS = ("weights", "precision", "num_workers", "prefetch_factor", "allow_lowres", "backend")


def merge_legacy(
    func: str,
    configs: dict[str, Any],
    legacy: dict[str, Any],
    stacklevel: int = 3,
    keywords: Mapping[str, tuple[str, type]] = LEGACY_KEYWORDS,
    renamed: Mapping[str, str] | None = None,
    bare_encoder: bool = False,
) -> dict[str, Any]:
    """The configs of ``func`` with its deprecated flat keywords (``epochs=5``) moved into them.

    ``configs`` maps ``func``'s config arguments (``"training"``...) to what the caller gave (a config, a dict or
    None); ``keywords`` maps each old keyword to its config argument and class, and ``renamed`` an old keyword to
    its field where the names differ. An encoder given bare (a name or module) becomes the ``encoder`` field, the
    old spelling unless ``bare_encoder``. An old keyword of no argument in ``configs``, or one given in its config
    too, is a ``TypeError``; the others warn once (``FutureWarning``), naming the new spelling.
    """
    out = dict(configs)
    renamed = renamed or {}
    enc = out.get("encoder")
    bare = enc is not None and not isinstance(enc, EncoderConfig | Mapping)
    if bare:
        out["encoder"] = {"encoder": enc}
    unknown = [n for n in legacy if n not in keywords or keywords[n][0] not in out]
    if unknown:
        raise TypeError(f"{func}() got an unexpected keyword argument {unknown[0]!r}.")
    by_param: dict[str, list[str]] = {"encoder": []} if bare and not bare_encoder else {}
    for name, value in legacy.items():
        param, field = keywords[name][0], renamed.get(name, name)
        given: Any = out.get(param)
        if field in changed_fields(given):
            as_field = "" if field == name else f" (as {field})"
            raise TypeError(
                f"{func}(): {name} is given twice, as {name}= and in {param}=; give it in {param}= only{as_field}."
            )
        as_dict = given is None or isinstance(given, Mapping)
        out[param] = {**dict(given or {}), field: value} if as_dict else replace(given, **{field: value})
        by_param.setdefault(param, []).append(field)
    if by_param:
        hints = []
        for param, names in by_param.items():
            args = [f"{n}=..." for n in names]
            if param == "encoder" and bare:
                args.insert(0, repr(enc) if isinstance(enc, str) else "encoder=...")
            hints.append(f"{param}=agl.{CONFIG_ARGUMENTS[param].__name__}({', '.join(args)})")
        old = [f"{n}=" for n in legacy] + (["encoder=<a name>"] if bare and not bare_encoder else [])
        warnings.warn(
            f"{func}({', '.join(old)}) is deprecated and will be removed in the next release: use {', '.join(hints)}.",
            FutureWarning,
            stacklevel=stacklevel,
        )
    return out


def encoder_keywords(*names: str) -> Callable:
    """Accept the old keywords ``names``, fields of ``encoder=``, for one release (moved in by :func:`merge_legacy`)."""

    def wrap(func: Callable) -> Callable:
        sig = inspect.signature(func)

        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            old = {n: kwargs.pop(n) for n in list(kwargs) if n in names}  # in the order of the call
            if not old:
                return func(*args, **kwargs)
            bound = sig.bind_partial(*args, **kwargs)
            given = {"encoder": bound.arguments.get("encoder", sig.parameters["encoder"].default)}
            keywords = dict.fromkeys(names, ("encoder", EncoderConfig))
            given = merge_legacy(func.__name__, given, old, 3, keywords, bare_encoder=True)
            bound.arguments["encoder"] = given["encoder"]
            return func(*bound.args, **bound.kwargs)

        return inner

    return wrap
