"""Image encoders: a registry, timm models by name, local weight files, and their input normalisation.

:func:`get_encoder` turns a name (a registered encoder or any ``timm`` model), a torch module or a plain callable
into a module producing ``(B, D)`` features plus an ``info`` dict (name, normalisation, feature size, weights
file and its sha256). Local weight files load by parameter name, or, when the names differ but the tensors line
up one to one with equal shapes (e.g. the EfficientNet-Lite0 file in ``../shared/weights``), in order.
:func:`encoder_record` is the one description of how features were made, stored in
``.uns["agl_embeddings"][key]`` and in a model's config.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scanpy import logging as logg
from torch import nn

from agl_scverse._utils import sha256_file, versions

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_WEIGHTS",
    "CallableEncoder",
    "channel_stats",
    "encoder_record",
    "get_encoder",
    "list_encoders",
    "load_weights",
    "normalize",
    "register_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------ normalise
def normalize(
    batch: torch.Tensor | np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Turn uint8 patches into a normalised float tensor: ``(batch / 255 - mean) / std`` per channel.

    Parameters
    ----------
    batch
        uint8 tensor (or array) of shape ``(B, 3, H, W)`` or ``(3, H, W)``, values 0-255, as produced by
        :class:`SpotPatches`. Stays on its device.
    mean
        Per-channel mean in the 0-1 range (3 values, or 1 for all channels), e.g. ``info["mean"]`` from
        :func:`agl_scverse.model.get_encoder`.
    std
        Per-channel standard deviation, the same way (``info["std"]``).

    Returns
    -------
    float32 tensor of the same shape.

    Examples
    --------
    >>> import torch
    >>> x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    >>> normalize(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).unique().tolist()
    [1.0]
    """
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"normalize expects a uint8 torch tensor, got {type(batch).__name__}.")
    if batch.dtype != torch.uint8:
        raise TypeError(
            f"normalize expects uint8 patches (0-255), got dtype {batch.dtype}. Pass the raw SpotPatches output; "
            "a float input may already be normalised."
        )
    if batch.ndim not in (3, 4) or batch.shape[-3] != 3:
        raise ValueError(f"normalize expects (B, 3, H, W) or (3, H, W) patches, got shape {tuple(batch.shape)}.")
    m = channel_stats(mean, "mean")
    s = channel_stats(std, "std")
    if np.any(np.asarray(s) <= 0):
        raise ValueError(f"std must be positive, got {std}.")
    m_t = torch.tensor(m, dtype=torch.float32, device=batch.device).view(3, 1, 1)
    s_t = torch.tensor(s, dtype=torch.float32, device=batch.device).view(3, 1, 1)
    return (batch.float().div_(255.0) - m_t) / s_t


def channel_stats(values: Sequence[float] | float, name: str) -> list[float]:
    arr = np.atleast_1d(np.asarray(values, dtype=float)).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel), got {values!r}.")
    return [float(v) for v in arr]


#: Weight files whose normalisation we know (sha256 -> architecture and mean/std), see ../shared/weights/README.
KNOWN_WEIGHTS: dict[str, dict[str, Any]] = {
    "7a46569badf7242317c17b5610f1a33b90bd0f96aa373e396f6b4f050e3c1596": {
        "arch": "densenet121",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    },
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db": {
        "arch": "tf_efficientnet_lite0",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    },
}

_REGISTRY: dict[str, dict[str, Any]] = {}
_CLASSIFIER_KEY = re.compile(r"(^|\.)(_?fc|classifier|last_linear|head)(\.fc)?\.(weight|bias)$")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


# ------------------------------------------------------------------------------------------------ registry
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
        Name used in ``encoder=name`` (takes precedence over a ``timm`` model of the same name).
    factory
        Callable returning a module (or a tensor -> tensor callable) that maps ``(B, 3, H, W)`` normalised
        images to ``(B, D)`` features. If it accepts a ``pretrained`` argument, it receives it.
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
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"An encoder named {name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[name] = {"factory": factory, "mean": channel_stats(mean, "mean"), "std": channel_stats(std, "std")}


def list_encoders() -> list[str]:
    """Names registered with :func:`register_encoder` (any ``timm`` model name works too).

    Examples
    --------
    >>> isinstance(list_encoders(), list)
    True
    """
    return sorted(_REGISTRY)


# ------------------------------------------------------------------------------------------------ modules
class CallableEncoder(nn.Module):
    """Wrap a tensor -> tensor callable as a module (no parameters)."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x)
        return y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))


def _safe_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_") or "encoder"


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models() + list(_REGISTRY), n=5)
        raise ValueError(
            f"Unknown encoder {name!r}: neither registered (register_encoder) nor a timm model. "
            f"Close timm names: {close}. Or pass a torch module or callable."
        )
    return timm.create_model(name, pretrained=pretrained, num_classes=0)


# ------------------------------------------------------------------------------------------------ weights
def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {path} not found; pass the path to a torch state dict.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"Could not read {path} as a torch state dict ({type(e).__name__}: {e}). Save weights with "
                "torch.save(model.state_dict(), path) (pickled whole models are not loaded, for safety)."
            ) from None
    for _ in range(3):  # unwrap {"state_dict": {...}} and similar checkpoint layouts
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor).")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{path} holds no tensors.")
    for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_weights(module: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a local state dict into ``module``; returns a summary of what matched.

    Tensors are matched by name (shapes must agree). If that leaves model tensors unloaded but the file's
    tensors, minus classifier layers the model does not have, line up one to one with the model's in order with
    equal shapes, they are mapped in order (files whose keys differ in name only, such as the EfficientNet-Lite0
    file). Otherwise the name matches are loaded (``strict=False``) and the rest is reported. Raises if nothing
    matched. ``num_batches_tracked`` buffers are ignored.

    Examples
    --------
    >>> import timm, torch
    >>> m = timm.create_model("resnet18", num_classes=0)
    >>> torch.save(m.state_dict(), "/tmp/r18.pt")  # doctest: +SKIP
    >>> load_weights(timm.create_model("resnet18", num_classes=0), "/tmp/r18.pt")["method"]  # doctest: +SKIP
    'name'
    """
    sd = _read_state_dict(path)
    msd = module.state_dict()

    def real(k: str) -> bool:
        return not k.endswith("num_batches_tracked")

    model_keys = [k for k in msd if real(k)]
    by_name = {k: v for k, v in sd.items() if k in msd and tuple(msd[k].shape) == tuple(v.shape)}
    shape_mismatch = [k for k in sd if k in msd and k not in by_name]
    classifier = [k for k in sd if k not in msd and _CLASSIFIER_KEY.search(k)]
    mapping, method = by_name, "name"
    if any(k not in by_name for k in model_keys):
        f_items = [(k, v) for k, v in sd.items() if real(k) and k not in classifier]
        m_items = [(k, msd[k]) for k in model_keys]
        if (
            len(f_items) == len(m_items)
            and len(m_items) > 0
            and all(tuple(fv.shape) == tuple(mv.shape) for (_, fv), (_, mv) in zip(f_items, m_items))
        ):
            n_named = sum(k in by_name for k in model_keys)
            if n_named < len(m_items):
                mapping = {mk: fv for (_, fv), (mk, _) in zip(f_items, m_items)}
                method = "order"
    loaded_real = [k for k in mapping if real(k)]
    if not loaded_real:
        hint = ""
        try:
            known = KNOWN_WEIGHTS.get(sha256_file(path))
        except OSError:  # pragma: no cover
            known = None
        if known:
            hint = f" This file holds {known['arch']!r} weights: use encoder={known['arch']!r}."
        raise ValueError(
            f"No tensor of {path} matches the encoder ({type(module).__name__}): file keys e.g. {list(sd)[:3]}, "
            f"model keys e.g. {model_keys[:3]}; {len(shape_mismatch)} names matched with different shapes. "
            f"Check that the weights belong to this architecture.{hint}"
        )
    used_file_keys = set(mapping) if method == "name" else {k for k, _ in f_items}
    missing = [k for k in model_keys if k not in mapping]
    unexpected = [k for k in sd if real(k) and k not in used_file_keys and k not in classifier]
    module.load_state_dict(dict(mapping.items()), strict=False)
    summary = {
        "method": method,
        "n_loaded": len(loaded_real),
        "n_model": len(model_keys),
        "missing": missing,
        "unexpected": unexpected,
        "dropped_classifier": classifier,
        "shape_mismatch": shape_mismatch,
    }
    logg.info(
        f"Loaded {len(loaded_real)}/{len(model_keys)} tensors of {type(module).__name__} from {Path(path).name} "
        f"(matched by {method}; dropped {len(classifier)} classifier tensors)."
    )
    if missing or unexpected or shape_mismatch:
        logg.warning(
            f"Weights {Path(path).name}: {len(missing)} model tensors not in the file keep their initial values "
            f"(e.g. {missing[:3]}); {len(unexpected)} file tensors unused (e.g. {unexpected[:3]}); "
            f"{len(shape_mismatch)} with mismatched shapes (e.g. {shape_mismatch[:3]})."
        )
    return summary


# ------------------------------------------------------------------------------------------------ factory
def get_encoder(
    name_or_module: str | nn.Module | Callable | tuple[nn.Module, dict] = "resnet18",
    weights: str | Path | None = None,
    pretrained: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """An image encoder producing ``(B, D)`` features, and how to feed it.

    Parameters
    ----------
    name_or_module
        A name registered with :func:`register_encoder`, any ``timm`` model name (built with
        ``num_classes=0`` so it returns pooled features), a torch module, a tensor -> tensor callable, or a
        ``(module, info)`` pair returned earlier by this function.
    weights
        Path to a local state dict (``.pth``/``.pt``/``.safetensors``) loaded with :func:`load_weights`.
    pretrained
        Ask ``timm`` (or the registered factory) for pretrained weights; needs the model hub. Default: random
        initialisation (seeded by ``seed``), or ``weights``.
    mean
        Per-channel mean of the input normalisation, overriding the default: the known normalisation of the
        weights file (mean = std = 0.5 for the EfficientNet-Lite0 file), else timm's ``pretrained_cfg``, else
        the registered values, else ImageNet.
    std
        Per-channel standard deviation of the input normalisation, overriding the same default.
    seed
        Seed of the random initialisation (the global torch RNG is left untouched).

    Returns
    -------
    module
        The encoder (built ones in eval mode; a module passed in keeps its mode), mapping normalised ``(B, 3, H, W)`` float images to ``(B, D)``.
    info
        ``name``, ``mean``, ``std``, ``feature_dim`` (None when unknown until a first batch), ``weights_path``,
        ``weights_sha256`` (``""`` without a file), ``pretrained``, ``source``, ``normalisation`` (where mean/std
        come from), ``weights_load`` (summary of :func:`load_weights`, or ``{}``).

    Examples
    --------
    >>> model, info = get_encoder("resnet18")
    >>> info["feature_dim"], info["mean"]
    (512, [0.485, 0.456, 0.406])
    """
    if isinstance(name_or_module, tuple):
        if len(name_or_module) != 2 or not isinstance(name_or_module[1], dict):
            raise TypeError("A tuple encoder must be the (module, info) pair returned by get_encoder.")
        if weights is not None or pretrained:
            raise ValueError("weights/pretrained cannot be applied to a (module, info) pair; build a new encoder.")
        module, info = name_or_module
        for key in ("name", "mean", "std"):
            if key not in info:
                raise KeyError(f"Encoder info lacks {key!r}; pass the pair returned by get_encoder.")
        info = dict(info)
        if mean is not None:
            info["mean"], info["normalisation"] = channel_stats(mean, "mean"), "user"
        if std is not None:
            info["std"], info["normalisation"] = channel_stats(std, "std"), "user"
        return module, info

    if weights is not None and pretrained:
        raise ValueError("Pass either weights=<local file> or pretrained=True, not both.")
    norm_mean, norm_std, norm_src = list(IMAGENET_MEAN), list(IMAGENET_STD), "imagenet default"
    if isinstance(name_or_module, str):
        name = name_or_module
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            if name in _REGISTRY:
                reg = _REGISTRY[name]
                factory = reg["factory"]
                accepts = "pretrained" in inspect.signature(factory).parameters
                if pretrained and not accepts:
                    raise ValueError(f"Registered encoder {name!r} has no pretrained option.")
                built = factory(pretrained=pretrained) if accepts else factory()
                source = "registry"
                norm_mean, norm_std, norm_src = list(reg["mean"]), list(reg["std"]), "registry"
            else:
                built = _create_timm(name, pretrained)
                source = "timm"
                cfg = getattr(built, "pretrained_cfg", None) or {}
                if "mean" in cfg and "std" in cfg:
                    norm_mean, norm_std = channel_stats(cfg["mean"], "mean"), channel_stats(cfg["std"], "std")
                    norm_src = "timm pretrained_cfg"
        module = built if isinstance(built, nn.Module) else CallableEncoder(built)
    elif isinstance(name_or_module, nn.Module):
        if pretrained:
            raise ValueError("pretrained=True applies to encoder names only; load weights into your module yourself.")
        module, name, source = name_or_module, type(name_or_module).__name__.lower(), "module"
    elif callable(name_or_module):
        if pretrained:
            raise ValueError("pretrained=True applies to encoder names only.")
        module = CallableEncoder(name_or_module)
        name, source = getattr(name_or_module, "__name__", "callable"), "callable"
        if name == "<lambda>":
            name = "callable"
    else:
        raise TypeError(f"encoder must be a name, a torch module or a callable, got {type(name_or_module).__name__}.")

    weights_path, weights_sha, load_summary = "", "", {}
    if weights is not None:
        weights_path = str(Path(weights).expanduser().resolve())
        load_summary = load_weights(module, weights_path)
        weights_sha = sha256_file(weights_path)
        known = KNOWN_WEIGHTS.get(weights_sha)
        if known is not None:
            norm_mean, norm_std = list(known["mean"]), list(known["std"])
            norm_src = f"known weights file ({known['arch']})"
    if mean is not None:
        norm_mean, norm_src = channel_stats(mean, "mean"), "user"
    if std is not None:
        norm_std, norm_src = channel_stats(std, "std"), "user"
    if source != "module":  # a caller's own module keeps its mode; embed_patches sets eval mode while it runs
        module.eval()
    fdim = getattr(module, "num_features", None)
    info = {
        "name": _safe_name(str(name)),
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
    }
    return module, info


#: Fields of an encoder record that must agree between a slide's embedding and a model (see agl_predict).
RECORD_CHECKED = ("encoder", "weights_sha256", "patch_px", "patch_um")


def encoder_record(info: dict[str, Any], patch_px: int, patch_um: float, **extra: Any) -> dict[str, Any]:
    """The one description of how spot features are made from patches.

    Stored as ``.uns["agl_embeddings"][key]`` by :func:`agl_scverse.pp.embed_patches` and as
    ``config["encoder"]`` of a fine-tuned model; :func:`agl_scverse.tl.agl_predict` compares the fields of
    :data:`RECORD_CHECKED` of both sides.

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
    }
    rec.update(extra)
    rec["versions"] = versions()
    return rec
