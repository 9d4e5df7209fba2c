"""The encoder record: the one description of how spot features were made, and the encoder rebuilt from it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from agl_scverse._utils import versions

from ._factory import get_encoder
from ._presets import find_preset, kwargs_from_json
from ._weights import weights_sha256

__all__ = ["RECORD_CHECKED", "check_weights_file", "encoder_record", "rebuild_encoder", "record_kwargs"]


def rebuild_encoder(
    record: dict[str, Any],
    weights: str | Path | None = None,
    encoder: str | nn.Module | Callable | tuple[nn.Module, dict] | None = None,
    what: str = "the model",
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the encoder an :func:`encoder_record` describes (to embed a new slide the same way).

    Parameters
    ----------
    record
        ``model.config["encoder"]`` or ``.uns["agl_embeddings"][key]``.
    weights
        The weights file it was built from, when it records a ``weights_sha256`` (checked; a recorded path is
        never opened).
    encoder
        The encoder itself, for a record of a custom module or callable (these cannot be rebuilt).
    what
        How to name the record's owner in messages.

    Returns
    -------
    The ``(module, info)`` pair of :func:`get_encoder`.

    Examples
    --------
    >>> rec = encoder_record(get_encoder("resnet18")[1], 224, 112.0)
    >>> rebuild_encoder(rec)[1]["name"]
    'resnet18'
    """
    rec = dict(record or {})
    source = rec.get("source")
    if encoder is not None:
        if isinstance(encoder, str) and source not in ("module", "callable"):
            raise ValueError(f"encoder={encoder!r} is a name; {what} records its encoder: leave encoder out.")
        if weights is not None and not isinstance(encoder, str):
            raise ValueError("Pass weights only with an encoder name; load them into your module yourself.")
        return get_encoder(encoder, weights=weights) if not isinstance(encoder, tuple) else get_encoder(encoder)
    if source in ("module", "callable"):
        raise ValueError(
            f"{what} was fitted with features of a custom {source} encoder ({rec.get('encoder')!r}), which cannot "
            "be rebuilt from its config. Pass the same encoder (with its weights loaded), e.g. "
            "agl.tl.agl_predict(adata, model, encoder=my_module), or embed the slide yourself into .obsm."
        )
    spec = rec.get("spec") or rec.get("encoder")
    if not spec:
        raise KeyError(f"{what} records no encoder name; pass encoder= or embed the slide yourself.")
    hub = check_weights_file(rec, weights, what)
    sha = str(rec.get("weights_sha256") or "")
    user_norm = rec.get("normalisation") == "user"
    module, info = get_encoder(
        spec, weights=weights, pretrained=hub, seed=int(rec.get("seed") or 0),
        mean=rec.get("mean") if user_norm else None, std=rec.get("std") if user_norm else None,
        encoder_kwargs=record_kwargs(rec), strict=bool(rec.get("strict", True)),
    )  # fmt: skip
    if hub and sha and info["weights_sha256"] and info["weights_sha256"] != sha:
        raise ValueError(
            f"The hub weights of {spec!r} in the local cache (sha256 {info['weights_sha256'][:12]}...) differ from "
            f"those {what} was trained with ({sha[:12]}...); pass that weights file instead."
        )
    return module, info


def check_weights_file(record: dict[str, Any] | None, weights: str | Path | None, what: str = "the model") -> bool:
    """Check ``weights`` against an encoder record (the file it needs, by sha256); return whether it uses hub weights.

    Raises ``FileNotFoundError`` when the record needs a weights file and ``weights`` is missing or not a file, and
    ``ValueError`` when its sha256 differs or the record needs none. Reads nothing the record names.
    """
    rec = dict(record or {})
    sha = str(rec.get("weights_sha256") or "")
    hub = bool(rec.get("pretrained")) and bool(rec.get("hf_hub") or rec.get("source") == "timm")
    if sha and not hub:
        if weights is None:
            raise FileNotFoundError(
                f"Embedding the slide needs the encoder weights file {what} was trained with (sha256 {sha[:12]}..., "
                f"recorded as {rec.get('weights_path')!r}). Pass weights=<path to that file> (its sha256 is checked) "
                "or embed the slide yourself."
            )
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights={str(weights)!r} is not a file.")
        if weights_sha256(weights) != sha:
            raise ValueError(
                f"The weights file {weights} differs from the one {what} was trained with (sha256 {sha[:12]}...)."
            )
    elif weights is not None:
        raise ValueError(
            f"weights={str(weights)!r} was given, but {what}'s encoder ({rec.get('encoder')!r}) was not built from "
            "a weights file (it records no weights_sha256 or used the hub's weights); leave weights out."
        )
    return hub


def record_kwargs(rec: dict[str, Any]) -> dict[str, Any]:
    """The user's part of an encoder record's timm kwargs (a preset applies its own again)."""
    kw = kwargs_from_json(rec.get("encoder_kwargs"))
    preset = find_preset(str(rec.get("preset") or "")) if rec.get("preset") else None
    if preset is not None:
        own = kwargs_from_json(preset.timm_kwargs)
        kw = {k: v for k, v in kw.items() if k not in own or own[k] != v}
    return kw


#: Fields of an encoder record that must agree between a slide's embedding and a model (see agl_predict).
RECORD_CHECKED = ("encoder", "weights_sha256", "patch_px", "patch_um", "encoder_kwargs", "tta")


def encoder_record(info: dict[str, Any], patch_px: int, patch_um: float, **extra: Any) -> dict[str, Any]:
    """The one description of how spot features are made from patches.

    Stored as ``.uns["agl_embeddings"][key]`` and as a fine-tuned model's ``config["encoder"]``;
    :func:`agl_scverse.tl.agl_predict` compares the fields of :data:`RECORD_CHECKED` of both.

    Parameters
    ----------
    info
        The ``info`` dict of :func:`get_encoder`.
    patch_px
        Patch side in pixels.
    patch_um
        Patch side in µm.
    **extra
        More fields (e.g. the patch settings of :meth:`agl_scverse.pp.SpotPatches.record`).

    Returns
    -------
    The record (JSON- and h5ad-serialisable).

    Examples
    --------
    >>> rec = encoder_record(get_encoder("resnet18")[1], 224, 112.0)
    >>> rec["encoder"], rec["patch_px"], rec["weights_sha256"]
    ('resnet18', 224, None)
    """
    rec = {
        "encoder": str(info["name"]),
        "source": info.get("source") or None,
        "weights_path": info.get("weights_path") or None,  # None (left out of .uns): random or hub weights
        "weights_sha256": info.get("weights_sha256") or None,
        "weights_load": (info.get("weights_load") or {}).get("method") or None,
        "pretrained": bool(info.get("pretrained", False)),
        "seed": int(info.get("seed", 0)),
        "mean": [float(v) for v in info["mean"]],
        "std": [float(v) for v in info["std"]],
        "normalisation": info.get("normalisation") or None,
        "feature_dim": int(info["feature_dim"]) if info.get("feature_dim") else None,
        "patch_px": int(patch_px),
        "patch_um": float(patch_um),
        # how to rebuild it (rebuild_encoder); absent in records of older versions
        "spec": info.get("spec") or None,
        "preset": info.get("preset") or None,
        "arch": info.get("arch") or None,
        "encoder_kwargs": info.get("encoder_kwargs") or None,
        "hf_hub": info.get("hf_hub") or None,
        "native_mpp": float(info["native_mpp"]) if info.get("native_mpp") else None,
        "strict": bool(info.get("strict", True)),
    }
    rec.update(extra)
    rec["versions"] = versions()
    return rec
