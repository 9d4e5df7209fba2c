"""The encoder factory: a name, a module or a callable into a module producing ``(B, D)`` features, and its ``info``."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from scanpy import logging as logg
from torch import nn

from ._hub import WEIGHT_FILES, hub_file, read_hub_config, split_hub_name
from ._modules import CallableEncoder, ClsMeanPool
from ._normalize import IMAGENET_MEAN, IMAGENET_STD, channel_stats
from ._presets import find_preset, kwargs_from_json, kwargs_to_json
from ._registry import REGISTRY, safe_name
from ._timm import build_timm, check_timm_name
from ._weights import KNOWN_WEIGHTS, load_weights, weights_sha256

if TYPE_CHECKING:
    from timm.models import VisionTransformer

__all__ = ["check_native_scale", "get_encoder"]


def get_encoder(
    name_or_module: str | nn.Module | Callable | tuple[nn.Module, dict] = "resnet18",
    weights: str | Path | None = None,
    pretrained: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    *,
    encoder_kwargs: dict[str, Any] | None = None,
    strict: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """An image encoder producing ``(B, D)`` features, and how to feed it.

    Parameters
    ----------
    name_or_module
        A preset name or hub id (:func:`list_presets`), another timm model on the hub (``"hf-hub:<org>/<model>"``),
        a name registered with :func:`register_encoder`, a timm model name (``num_classes=0``), a torch module, a
        tensor -> tensor callable, or a ``(module, info)`` pair returned earlier.
    weights
        A local state dict (``.safetensors``, ``.bin``, ``.pth``, ``.pt``) loaded with :func:`load_weights`.
    pretrained
        The published weights (the hub repository's, or timm's), from the local cache, else downloaded when the
        hub is reachable, else a ``FileNotFoundError`` that says how to get them. Default: random (``seed``).
    mean
        Per-channel mean of the input normalisation, overriding the default: the preset's, else the known
        normalisation of the weights file (mean = std = 0.5 for the EfficientNet-Lite0 file), else timm's
        ``pretrained_cfg``, else the registered values, else ImageNet.
    std
        Per-channel standard deviation of the input normalisation, overriding the same default.
    seed
        Seed of the random initialisation (the global torch RNG is left untouched).
    encoder_kwargs
        ``timm.create_model`` keyword arguments (over a preset's), e.g. ``{"init_values": 1e-5}``; layer classes
        or their names work (recorded as JSON, so a saved model can rebuild the encoder).
    strict
        Weights must fit exactly (see :func:`load_weights`); ``False`` loads what matches, with a warning.

    Returns
    -------
    module
        The encoder (built ones in eval mode; a module passed in keeps its mode).
    info
        ``name``, ``mean``, ``std``, ``feature_dim`` (None when unknown), ``weights_path``, ``weights_sha256``,
        ``pretrained``, ``source``, ``normalisation`` (where mean/std come from), ``weights_load``, and what
        rebuilds it: ``spec``, ``preset``, ``arch``, ``encoder_kwargs`` (JSON), ``hf_hub``, ``native_mpp``,
        ``strict``.

    Examples
    --------
    >>> model, info = get_encoder("resnet18")
    >>> info["feature_dim"], info["mean"]
    (512, [0.485, 0.456, 0.406])
    >>> import torch
    >>> with torch.device("meta"):  # the UNI architecture, no weights and no memory
    ...     vit, info = get_encoder("hf-hub:MahmoodLab/UNI")
    >>> info["name"], info["feature_dim"], info["native_mpp"], "blocks.0.ls1.gamma" in vit.state_dict()
    ('uni', 1024, 0.5, True)
    """
    if isinstance(name_or_module, tuple):
        if weights is not None or pretrained or encoder_kwargs:
            raise ValueError(
                "weights/pretrained/encoder_kwargs cannot be applied to a (module, info) pair; build a new encoder."
            )
        return _from_pair(name_or_module, mean, std)
    if weights is not None and pretrained:
        raise ValueError("Pass either weights=<local file> or pretrained=True, not both.")
    user_kwargs = kwargs_from_json(kwargs_to_json(encoder_kwargs))  # checks they have a JSON form
    b: dict[str, Any] = {
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "norm_src": "imagenet default", "preset": None,
        "arch": None, "hub_repo": None, "spec": None, "native_mpp": None, "pooling": None, "key_format": "timm",
        "ignore_keys": (), "kwargs_json": "{}", "hub_weights": None,
    }  # fmt: skip
    if isinstance(name_or_module, str):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            built = _build_named(name_or_module, pretrained, user_kwargs, b)
        module = built if isinstance(built, nn.Module) else CallableEncoder(built)
        name, source = b["name"], b["source"]
    elif isinstance(name_or_module, nn.Module):
        if pretrained or encoder_kwargs:
            raise ValueError(
                "pretrained=True / encoder_kwargs apply to encoder names only; build and load your module yourself."
            )
        module, name, source = name_or_module, type(name_or_module).__name__.lower(), "module"
    elif callable(name_or_module):
        if pretrained or encoder_kwargs:
            raise ValueError("pretrained=True / encoder_kwargs apply to encoder names only.")
        module = CallableEncoder(name_or_module)
        name, source = getattr(name_or_module, "__name__", "callable"), "callable"
        if name == "<lambda>":
            name = "callable"
    else:
        raise TypeError(f"encoder must be a name, a torch module or a callable, got {type(name_or_module).__name__}.")

    norm_mean, norm_std, norm_src = b["mean"], b["std"], b["norm_src"]
    weights_path, weights_sha, load_summary = "", "", {}
    file = weights if weights is not None else b["hub_weights"]
    if file is not None:
        weights_path = str(Path(file).expanduser().resolve())
        load_summary = load_weights(
            module, weights_path, strict=strict, key_format=b["key_format"], ignore_keys=b["ignore_keys"]
        )
        weights_sha = weights_sha256(weights_path)
        known = KNOWN_WEIGHTS.get(weights_sha)
        if known is not None and b["preset"] is None:
            norm_mean, norm_std = list(known["mean"]), list(known["std"])
            norm_src = f"known weights file ({known['arch']})"
    if b["pooling"] == "cls+mean":  # presets pooled so are timm ViTs
        module = ClsMeanPool(cast("VisionTransformer", module))
    if mean is not None:
        norm_mean, norm_src = channel_stats(mean, "mean"), "user"
    if std is not None:
        norm_std, norm_src = channel_stats(std, "std"), "user"
    if source != "module":  # a caller's own module keeps its mode; embed_patches sets eval mode while it runs
        module.eval()
    fdim = getattr(module, "num_features", None)
    info = {
        "name": safe_name(str(name)),
        "mean": [float(v) for v in norm_mean],
        "std": [float(v) for v in norm_std],
        "feature_dim": int(fdim) if isinstance(fdim, int | np.integer) else None,
        "weights_path": weights_path,
        "weights_sha256": weights_sha,
        "pretrained": bool(pretrained),
        "source": source,
        "normalisation": norm_src,
        "seed": int(seed),
        "weights_load": load_summary,
        "spec": b["spec"],
        "preset": b["preset"].name if b["preset"] is not None else None,
        "arch": b["arch"],
        "encoder_kwargs": b["kwargs_json"] if source in ("preset", "hf-hub", "timm") else None,
        "hf_hub": b["hub_repo"],
        "native_mpp": b["native_mpp"],
        "strict": bool(strict),
    }
    return module, info


def _from_pair(pair: tuple, mean, std) -> tuple[nn.Module, dict[str, Any]]:
    """A ``(module, info)`` pair of :func:`get_encoder`, checked, with a new normalisation if given."""
    if len(pair) != 2 or not isinstance(pair[1], dict):
        raise TypeError("A tuple encoder must be the (module, info) pair returned by get_encoder.")
    module, info = pair
    for key in ("name", "mean", "std"):
        if key not in info:
            raise KeyError(f"Encoder info lacks {key!r}; pass the pair returned by get_encoder.")
    return module, {**info, **_user_norm(mean, std)}


def _user_norm(mean: Any, std: Any) -> dict[str, Any]:
    """The ``info`` entries of a normalisation given by the user (none when neither is given)."""
    out: dict[str, Any] = {} if mean is None else {"mean": channel_stats(mean, "mean"), "normalisation": "user"}
    return out if std is None else {**out, "std": channel_stats(std, "std"), "normalisation": "user"}


def _build_named(name: str, pretrained: bool, user_kwargs: dict[str, Any], b: dict[str, Any]) -> Any:
    """Build an encoder from a name (preset, ``hf-hub:``, registered, timm); fill ``b`` with how it was built."""
    import timm

    b["spec"], b["name"] = name, name
    preset = b["preset"] = find_preset(name)
    hub_repo = split_hub_name(name) if preset is None else None
    if preset is None and hub_repo is None and name not in REGISTRY:
        check_timm_name(name)
    if preset is not None:
        if pretrained:  # before building: a missing file fails at once
            b["hub_weights"] = hub_file(preset.hf_hub, WEIGHT_FILES, preset.gated, "The weights file")
        kw = {**kwargs_from_json(preset.timm_kwargs), **user_kwargs}
        b["kwargs_json"] = kwargs_to_json({**preset.timm_kwargs, **json.loads(kwargs_to_json(user_kwargs))})
        b.update(
            name=preset.name, source="preset", arch=preset.arch, hub_repo=preset.hf_hub, native_mpp=preset.mpp,
            pooling=preset.pooling, key_format=preset.key_format, ignore_keys=preset.ignore_keys,
            mean=list(preset.mean), std=list(preset.std), norm_src=f"preset {preset.name}",
        )  # fmt: skip
        return timm.create_model(preset.arch, pretrained=False, num_classes=0, **kw)
    if hub_repo is not None:
        cfg = read_hub_config(hub_repo, gated=None)
        if pretrained:
            b["hub_weights"] = hub_file(hub_repo, WEIGHT_FILES, None, "The weights file")
        arch = cfg["architecture"]
        check_timm_name(arch)
        model_args = dict(cfg.get("model_args") or {})
        model_args.pop("num_classes", None)
        b["kwargs_json"] = kwargs_to_json({**model_args, **json.loads(kwargs_to_json(user_kwargs))})
        b.update(source="hf-hub", arch=arch, hub_repo=hub_repo)
        _cfg_norm(cfg.get("pretrained_cfg"), f"hub config of {hub_repo}", b)
        return timm.create_model(arch, pretrained=False, num_classes=0, **{**model_args, **user_kwargs})
    if name in REGISTRY:
        if user_kwargs:
            raise ValueError(f"encoder_kwargs apply to timm models and presets, not to registered encoder {name!r}.")
        reg = REGISTRY[name]
        factory = reg["factory"]
        accepts = "pretrained" in inspect.signature(factory).parameters
        if pretrained and not accepts:
            raise ValueError(f"Registered encoder {name!r} has no pretrained option.")
        b.update(source="registry", mean=list(reg["mean"]), std=list(reg["std"]), norm_src="registry")
        return factory(pretrained=pretrained) if accepts else factory()
    built = build_timm(name, pretrained, user_kwargs)
    b.update(source="timm", arch=name, kwargs_json=kwargs_to_json(user_kwargs))
    _cfg_norm(getattr(built, "pretrained_cfg", None), "timm pretrained_cfg", b)
    return built


def _cfg_norm(cfg: dict[str, Any] | None, source: str, b: dict[str, Any]) -> None:
    """The mean / std of a timm ``pretrained_cfg`` into ``b`` when it has both."""
    if cfg and "mean" in cfg and "std" in cfg:
        b.update(mean=channel_stats(cfg["mean"], "mean"), std=channel_stats(cfg["std"], "std"), norm_src=source)


def check_native_scale(info: dict[str, Any], patch_px: int, patch_um: float, rtol: float = 0.25) -> None:
    """Warn when patches are cut at another µm/px than the encoder's native resolution (when it is known)."""
    mpp = info.get("native_mpp")
    if not mpp or not patch_px:
        return
    got = float(patch_um) / float(patch_px)
    if abs(got / float(mpp) - 1.0) > rtol:
        logg.warning(
            f"Encoder {info.get('name')!r} was trained at {mpp} µm/px but the patches are {got:.3g} µm/px "
            f"(patch_um={patch_um} / patch_px={patch_px}); features may be off. For its native scale use "
            f"patch_um={float(mpp) * patch_px:g} with patch_px={patch_px}."
        )
