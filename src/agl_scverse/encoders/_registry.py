"""The encoder registry (names users register, :func:`register_encoder`) and the name an encoder is given."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ._normalize import IMAGENET_MEAN, IMAGENET_STD, channel_stats
from ._presets import find_preset

__all__ = ["REGISTRY", "encoder_name", "list_encoders", "register_encoder", "safe_name"]


#: Encoders registered by name (:func:`register_encoder`).
REGISTRY: dict[str, dict[str, Any]] = {}


def register_encoder(
    name: str,
    factory: Callable[..., nn.Module | Callable],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    overwrite: bool = False,
) -> None:
    """Register an encoder under ``name`` for :func:`get_encoder` and :func:`embed_patches`.

    Parameters
    ----------
    name
        Name used in ``encoder=name`` (over a ``timm`` model of the same name).
    factory
        Returns a module (or a tensor -> tensor callable) mapping normalised ``(B, 3, H, W)`` images to ``(B, D)``
        features; given ``pretrained`` if it takes that argument.
    mean
        Per-channel (RGB) mean of the input normalisation the encoder expects, in the 0-1 range.
    std
        Per-channel standard deviation of that normalisation.
    overwrite
        Replace an existing registration.

    Examples
    --------
    >>> import torch
    >>> register_encoder("tiny_mean", lambda: (lambda x: x.mean(dim=(2, 3))), overwrite=True)
    >>> get_encoder("tiny_mean")[1]["name"]
    'tiny_mean'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Encoder name must be a non-empty string, got {name!r}.")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}.")
    if name in REGISTRY and not overwrite:
        raise ValueError(f"An encoder named {name!r} is already registered; pass overwrite=True to replace it.")
    REGISTRY[name] = {"factory": factory, "mean": channel_stats(mean, "mean"), "std": channel_stats(std, "std")}


def list_encoders() -> list[str]:
    """Names registered with :func:`register_encoder` (any ``timm`` model name works too).

    Examples
    --------
    >>> isinstance(list_encoders(), list)
    True
    """
    return sorted(REGISTRY)


def safe_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_") or "encoder"


def encoder_name(encoder: Any) -> str:
    """The name :func:`get_encoder` gives an encoder (``info["name"]``, used in ``X_agl_<name>``), without building it."""
    if isinstance(encoder, tuple) and len(encoder) == 2 and isinstance(encoder[1], dict):
        return str(encoder[1].get("name", "encoder"))
    if isinstance(encoder, str):
        preset = find_preset(encoder)
        return preset.name if preset is not None else safe_name(encoder)
    if isinstance(encoder, nn.Module):
        return safe_name(type(encoder).__name__.lower())
    return "encoder"
