"""The encoder argument of embedding and predicting: one :class:`~agl_scverse.EncoderConfig`, old keywords for a release."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any

from agl_scverse.configs import EncoderConfig, as_config

__all__ = ["ENCODER_FIELDS", "as_encoder_config", "encoder_keywords", "explicit_fields"]

#: The fields of :class:`~agl_scverse.EncoderConfig`, in order.
ENCODER_FIELDS = tuple(f.name for f in fields(EncoderConfig))


def as_encoder_config(encoder: Any) -> EncoderConfig:
    """``encoder`` as an :class:`~agl_scverse.EncoderConfig`."""
    if encoder is None or isinstance(encoder, EncoderConfig | Mapping):
        return as_config(EncoderConfig, encoder, "encoder")
    return EncoderConfig(encoder=encoder)


def explicit_fields(encoder: Any) -> dict[str, Any]:
    """The fields the caller set: a dict's keys, a config's fields away from their defaults, a bare ``encoder``."""
    if encoder is None:
        return {}
    if isinstance(encoder, Mapping):
        return dict(encoder)
    if not isinstance(encoder, EncoderConfig):
        return {"encoder": encoder}
    default = EncoderConfig()
    return {n: getattr(encoder, n) for n in ENCODER_FIELDS if _differs(getattr(encoder, n), getattr(default, n))}


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # e.g. a module compared with a name
        return True


def _with_fields(encoder: Any, old: dict[str, Any]) -> Any:
    """``encoder`` with the fields ``old`` added (a config stays a config, a dict a dict)."""
    if isinstance(encoder, EncoderConfig):
        return replace(encoder, **old)
    if isinstance(encoder, Mapping):
        twice = sorted(set(encoder) & set(old))
        if twice:
            raise TypeError(f"{twice} given both as keywords and in the encoder dict; give them once, in encoder=.")
        return {**encoder, **old}
    return dict(old) if encoder is None else {"encoder": encoder, **old}


def _spelled(encoder: Any, old: dict[str, Any]) -> str:
    """The new spelling of a call, for the warning: ``encoder=agl.EncoderConfig(...)``."""
    name = encoder.encoder if isinstance(encoder, EncoderConfig) else encoder
    parts = [repr(name)] if isinstance(name, str) else []
    parts += [
        f"{k}={v!r}" if isinstance(v, str | int | float | bool) or v is None else f"{k}=..." for k, v in old.items()
    ]
    return f"encoder=agl.EncoderConfig({', '.join(parts)})"


def encoder_keywords(*names: str) -> Callable:
    """Accept the old keywords ``names`` (fields of :class:`~agl_scverse.EncoderConfig`) for one release."""
    unknown = sorted(set(names) - set(ENCODER_FIELDS))
    if unknown:
        raise ValueError(f"{unknown} are not fields of EncoderConfig.")

    def wrap(func: Callable) -> Callable:
        sig = inspect.signature(func)

        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            old = {n: kwargs.pop(n) for n in list(kwargs) if n in names}  # in the order of the call
            if not old:
                return func(*args, **kwargs)
            bound = sig.bind_partial(*args, **kwargs)
            encoder = bound.arguments.get("encoder", sig.parameters["encoder"].default)
            warnings.warn(
                f"{func.__name__}({', '.join(f'{n}=' for n in old)}) is deprecated and will be removed in the next "
                f"release; pass {_spelled(encoder, old)} (or a dict of those fields) instead.",
                FutureWarning,
                stacklevel=2,
            )
            bound.arguments["encoder"] = _with_fields(encoder, old)
            return func(*bound.args, **bound.kwargs)

        return inner

    return wrap
