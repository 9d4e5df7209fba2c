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
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scanpy import logging as logg
from torch import nn

from agl_scverse._utils import sha256_file, versions

from ._presets import PRESETS, find_preset, kwargs_from_json, kwargs_to_json

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_WEIGHTS",
    "CallableEncoder",
    "ClsMeanPool",
    "channel_stats",
    "check_native_scale",
    "encoder_name",
    "encoder_record",
    "get_encoder",
    "hub_offline",
    "list_encoders",
    "load_weights",
    "normalize",
    "rebuild_encoder",
    "record_kwargs",
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


def encoder_name(encoder: Any) -> str:
    """The name :func:`get_encoder` gives an encoder (``info["name"]``, used in ``X_agl_<name>``), without building it.

    Examples
    --------
    >>> encoder_name("hf-hub:MahmoodLab/UNI"), encoder_name("resnet18")
    ('uni', 'resnet18')
    """
    if isinstance(encoder, tuple) and len(encoder) == 2 and isinstance(encoder[1], dict):
        return str(encoder[1].get("name", "encoder"))
    if isinstance(encoder, str):
        preset = find_preset(encoder)
        return preset.name if preset is not None else _safe_name(encoder)
    if isinstance(encoder, nn.Module):
        return _safe_name(type(encoder).__name__.lower())
    return "encoder"


class ClsMeanPool(nn.Module):
    """A ViT whose features are its class token concatenated with the mean of its patch tokens (Virchow2).

    Register tokens (and any other prefix token after the class token) are left out of the mean.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.num_features = 2 * int(vit.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        n_prefix = int(getattr(self.vit, "num_prefix_tokens", 1))
        return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(dim=1)], dim=-1)


# ------------------------------------------------------------------------------------------------ the hub
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def hub_offline() -> bool:
    """Whether Hugging Face hub access is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    import os

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "on", "yes", "true"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return True


def _hub_reachable(timeout: float = 2.0) -> bool:
    """One quick TCP connection to the hub endpoint (no retries): False when offline or unreachable."""
    import socket
    from urllib.parse import urlparse

    if hub_offline():
        return False
    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
    except ImportError:  # pragma: no cover
        return False
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_help(repo: str, gated: bool | None, what: str) -> str:
    gate = {
        True: "It is gated: ",
        None: "If it is gated: ",
        False: "",
    }[gated]
    if gated is not False:
        gate += (
            f"log in (`hf auth login` or HF_TOKEN) with an account that accepted the terms on "
            f"https://huggingface.co/{repo}, then download. "
        )
    return (
        f"{what} of {repo!r} is not in the local Hugging Face cache and the hub is "
        f"{'switched off (HF_HUB_OFFLINE is set)' if hub_offline() else 'not reachable'}. {gate}Get it on a machine "
        f"with internet: `hf download {repo}` (fills the cache; copy ~/.cache/huggingface/hub or set "
        "HF_HOME) or download the weights file and pass its path: weights='/path/to/pytorch_model.bin'."
    )


def _hub_file(repo: str, names: Sequence[str], gated: bool | None, what: str) -> str:
    """Path of the first of ``names`` in the local cache; downloaded when the hub is reachable; else a fast error."""
    from huggingface_hub import try_to_load_from_cache

    for n in names:
        got = try_to_load_from_cache(repo, n)
        if isinstance(got, str) and Path(got).is_file():
            return got
    if not _hub_reachable():
        raise FileNotFoundError(_hub_help(repo, gated, what))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    for n in names:
        try:
            return hf_hub_download(repo, n)
        except EntryNotFoundError:
            continue
        except (GatedRepoError, RepositoryNotFoundError) as err:
            raise PermissionError(
                f"Cannot download {repo!r} ({type(err).__name__}). Gated models need a hub account that accepted "
                f"the terms on https://huggingface.co/{repo} and a login (`hf auth login` or HF_TOKEN); or "
                "download the weights file yourself and pass weights='/path/to/file'."
            ) from None
    raise FileNotFoundError(f"{repo!r} holds none of {list(names)}; download its weights and pass weights=<path>.")


def _split_hub_name(name: str) -> str | None:
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.lower().startswith(prefix):
            repo = name[len(prefix) :].strip()
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
                raise ValueError(f"{name!r} is not a hub name of the form 'hf-hub:<organisation>/<model>'.")
            return repo
    return None


# ------------------------------------------------------------------------------------------------ building
def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models() + list(_REGISTRY) + list(PRESETS), n=5)
        raise ValueError(
            f"Unknown encoder {name!r}: not a preset ({', '.join(PRESETS)}), not registered (register_encoder), "
            f"not a timm model, not an 'hf-hub:<org>/<model>' name. Close names: {close}. Or pass a torch module "
            "or callable."
        )


def _timm_pretrained_file(model: nn.Module) -> str | None:
    """A local copy of timm's pretrained weights of ``model`` (HF cache or torch hub cache), or None."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, rev = str(hub_id).partition("@")
        for n in ("model.safetensors", "pytorch_model.bin"):
            got = try_to_load_from_cache(repo, n, revision=rev or None)
            if isinstance(got, str) and Path(got).is_file():
                return got
    url = cfg.get("url")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(str(url).split("?")[0]).name
        if cached.is_file():
            return str(cached)
    return None


def _build_timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """A timm model by name (``num_classes=0``); pretrained weights from a local cache, else the hub, else fast error."""
    import timm

    _check_timm_name(name)
    kw = {"num_classes": 0, **kwargs}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kw)
    probe = timm.create_model(name, pretrained=False, **kw) if torch.get_default_device().type != "meta" else None
    local = _timm_pretrained_file(probe) if probe is not None else None
    if local is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": local}, **kw)
    if not _hub_reachable():
        cfg = getattr(probe, "pretrained_cfg", None) or {}
        where = cfg.get("hf_hub_id") or cfg.get("url") or name
        raise FileNotFoundError(
            f"pretrained=True: timm's weights of {name!r} ({where}) are not in the local cache and the hub is "
            f"{'switched off (HF_HUB_OFFLINE is set)' if hub_offline() else 'not reachable'}. On a machine with "
            "internet, run timm.create_model(name, pretrained=True) once (fills ~/.cache/huggingface or the torch "
            "hub cache) and copy the cache, or save the state dict and pass weights='/path/to/file'."
        )
    return timm.create_model(name, pretrained=True, **kw)


def _read_hub_config(repo: str, gated: bool | None) -> dict[str, Any]:
    path = _hub_file(repo, ("config.json",), gated, "The timm config (config.json)")
    with open(path) as fh:
        cfg = json.load(fh)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise ValueError(
            f"{repo!r}: config.json names no timm 'architecture'; it is not a timm model (transformers models "
            "need their own loader). Build the module yourself and pass it as encoder=."
        )
    return cfg


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


def _hf_dinov2_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ``Dinov2Model`` state dict to timm ViT names (query/key/value joined to qkv)."""
    if not any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in sd):
        return sd  # already timm names
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.register_tokens": "reg_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    parts = {
        "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    }  # fmt: skip
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    layer = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        m = layer.match(k)
        if m is None:
            out[k] = v  # left as is: reported as unexpected by the strict check
            continue
        i, rest = int(m.group(1)), m.group(2)
        att = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if att:
            qkv.setdefault((i, att.group(2)), {})[att.group(1)] = v
            continue
        head, _, leaf = rest.rpartition(".")
        if head in parts:
            out[f"blocks.{i}.{parts[head]}.{leaf}"] = v
        elif rest in parts:
            out[f"blocks.{i}.{parts[rest]}"] = v
        else:
            out[k] = v
    for (i, leaf), d in qkv.items():
        if set(d) != {"query", "key", "value"}:
            raise ValueError(f"Layer {i} of the Dinov2 checkpoint lacks some of query/key/value {leaf}.")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([d["query"], d["key"], d["value"]], dim=0)
    return out


def _fit_pos_embed(sd: dict[str, torch.Tensor], module: nn.Module) -> bool:
    """Resample the file's position embedding to the model's patch grid (a DINOv2 file made for 518 px)."""
    target = module.state_dict().get("pos_embed")
    src = sd.get("pos_embed")
    if target is None or src is None or tuple(src.shape) == tuple(target.shape) or src.ndim != 3:
        return False
    from timm.layers import resample_abs_pos_embed

    n_prefix = 0 if getattr(module, "no_embed_class", False) else int(getattr(module, "num_prefix_tokens", 1))
    n_src = src.shape[1] - n_prefix
    side = int(round(n_src**0.5))
    grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
    if side * side != n_src or grid is None:
        return False
    sd["pos_embed"] = resample_abs_pos_embed(
        src, new_size=list(grid), old_size=[side, side], num_prefix_tokens=n_prefix
    )
    return True


def _names(keys: Sequence[str], n: int = 12) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _strict_hint(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    ls = re.compile(r"(^|\.)ls[12]\.gamma$")
    if missing and all(ls.search(k) for k in missing):
        return (
            " The model has LayerScale tensors the file lacks: build the architecture without LayerScale "
            "(leave init_values out of encoder_kwargs)."
        )
    if unexpected and any(ls.search(k) for k in unexpected):
        return (
            " The file has LayerScale tensors (ls1.gamma/ls2.gamma), so the model must have LayerScale: use a "
            "preset (e.g. encoder='uni') or encoder_kwargs={'init_values': 1e-5}."
        )
    if unexpected and any("reg_token" in k for k in unexpected):
        return " The file has register tokens: pass encoder_kwargs={'reg_tokens': <n>} or use a preset."
    return ""


def load_weights(
    module: nn.Module,
    path: str | Path,
    strict: bool = True,
    key_format: str = "timm",
    ignore_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Load a local state dict into ``module``; returns a summary of what matched.

    Tensors are matched by name (shapes must agree). If that leaves model tensors unloaded but the file's
    tensors, minus classifier layers the model does not have, line up one to one with the model's in order with
    equal shapes, they are mapped in order (files whose keys differ in name only, such as the EfficientNet-Lite0
    file). Classifier tensors the model lacks (``fc``, ``head``, ``classifier``: the encoder has no classifier)
    are dropped and listed; ``num_batches_tracked`` buffers are ignored.

    Parameters
    ----------
    module
        The encoder.
    path
        ``.safetensors``, ``.bin``, ``.pth`` or ``.pt`` state dict (also inside ``{"state_dict": ...}``).
    strict
        Any model tensor missing from the file, any file tensor left unused, any shape mismatch is an error
        that lists the names (default). ``strict=False`` loads what matches and warns.
    key_format
        ``"timm"``, or ``"hf-dinov2"`` for a transformers ``Dinov2Model`` file (renamed to timm names; a
        position embedding for another patch grid is resampled).
    ignore_keys
        Patterns (``re.search``) of file tensors to leave out on purpose (e.g. ``"mask_token"``).

    Examples
    --------
    >>> import timm, torch
    >>> m = timm.create_model("resnet18", num_classes=0)
    >>> torch.save(m.state_dict(), "/tmp/r18.pt")  # doctest: +SKIP
    >>> load_weights(timm.create_model("resnet18", num_classes=0), "/tmp/r18.pt")["method"]  # doctest: +SKIP
    'name'
    """
    if key_format not in ("timm", "hf-dinov2"):
        raise ValueError(f"key_format must be 'timm' or 'hf-dinov2', got {key_format!r}.")
    sd = _read_state_dict(path)
    if key_format == "hf-dinov2":
        sd = _hf_dinov2_to_timm(sd)
    ignored = [k for k in sd if any(re.search(p, k) for p in ignore_keys)]
    for k in ignored:
        del sd[k]
    resampled = _fit_pos_embed(sd, module) if key_format == "hf-dinov2" else False
    msd = module.state_dict()

    def real(k: str) -> bool:
        return not k.endswith("num_batches_tracked")

    model_keys = [k for k in msd if real(k)]
    by_name = {k: v for k, v in sd.items() if k in msd and tuple(msd[k].shape) == tuple(v.shape)}
    shape_mismatch = [k for k in sd if k in msd and k not in by_name]
    classifier = [k for k in sd if k not in msd and _CLASSIFIER_KEY.search(k)]
    mapping, method = by_name, "name"
    f_items = [(k, v) for k, v in sd.items() if real(k) and k not in classifier]
    if any(k not in by_name for k in model_keys):
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
    unexpected = [k for k in sd if real(k) and k not in used_file_keys and k not in classifier and k not in msd]
    if strict and (missing or unexpected or shape_mismatch):
        problems = []
        if missing:
            problems.append(f"{len(missing)} model tensors are not in the file: {_names(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} file tensors are not used by the model: {_names(unexpected)}")
        if shape_mismatch:
            shown = [f"{k} {list(sd[k].shape)} vs {list(msd[k].shape)}" for k in shape_mismatch]
            problems.append(f"{len(shape_mismatch)} tensors differ in shape (file vs model): {_names(shown, 6)}")
        raise ValueError(
            f"Weights {Path(path).name} do not fit the encoder ({type(module).__name__}): "
            + "; ".join(problems)
            + f". Nothing was loaded.{_strict_hint(missing, unexpected)}"
        )
    module.load_state_dict(dict(mapping.items()), strict=False)
    summary = {
        "method": method,
        "n_loaded": len(loaded_real),
        "n_model": len(model_keys),
        "missing": missing,
        "unexpected": unexpected,
        "dropped_classifier": classifier,
        "ignored": ignored,
        "shape_mismatch": shape_mismatch,
        "strict": bool(strict),
        "pos_embed_resampled": bool(resampled),
    }
    logg.info(
        f"Loaded {len(loaded_real)}/{len(model_keys)} tensors of {type(module).__name__} from {Path(path).name} "
        f"(matched by {method}; dropped {len(classifier)} classifier tensors; ignored {len(ignored)})."
    )
    if missing or unexpected or shape_mismatch:
        logg.warning(
            f"Weights {Path(path).name} (strict=False): {len(missing)} model tensors not in the file keep their "
            f"initial values (e.g. {missing[:3]}); {len(unexpected)} file tensors unused (e.g. {unexpected[:3]}); "
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
    *,
    encoder_kwargs: dict[str, Any] | None = None,
    strict: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """An image encoder producing ``(B, D)`` features, and how to feed it.

    Parameters
    ----------
    name_or_module
        One of

        - a preset name (:data:`PRESETS`: ``"uni"``, ``"uni2-h"``, ``"virchow2"``, ``"h-optimus-0"``,
          ``"prov-gigapath"``, ``"phikon-v2"``; their hub ids such as ``"hf-hub:MahmoodLab/UNI"`` too): the
          published architecture, normalisation and pooling;
        - an ``"hf-hub:<org>/<model>"`` name of another timm model on the hub (its ``config.json`` and weights
          are read from the local Hugging Face cache; downloaded only when the hub is reachable);
        - a name registered with :func:`register_encoder`;
        - any ``timm`` model name (built with ``num_classes=0`` so it returns pooled features);
        - a torch module, a tensor -> tensor callable, or a ``(module, info)`` pair returned earlier.
    weights
        Path to a local state dict (``.safetensors``/``.bin``/``.pth``/``.pt``) loaded with :func:`load_weights`;
        its sha256 is recorded.
    pretrained
        Use the published weights: for a preset or an ``hf-hub:`` name the hub repository's weights file, for a
        timm name timm's pretrained weights. Read from the local cache; downloaded only when the hub is reachable;
        otherwise (e.g. ``HF_HUB_OFFLINE=1``) a ``FileNotFoundError`` at once that says how to get them. Default:
        random initialisation (seeded by ``seed``), or ``weights``.
    mean
        Per-channel mean of the input normalisation, overriding the default: the preset's, else the known
        normalisation of the weights file (mean = std = 0.5 for the EfficientNet-Lite0 file), else timm's
        ``pretrained_cfg``, else the registered values, else ImageNet.
    std
        Per-channel standard deviation of the input normalisation, overriding the same default.
    seed
        Seed of the random initialisation (the global torch RNG is left untouched).
    encoder_kwargs
        Keyword arguments of ``timm.create_model`` (over a preset's own), e.g. ``{"init_values": 1e-5}`` for
        LayerScale or ``{"img_size": 448}``. Layer classes (``mlp_layer=timm.layers.SwiGLUPacked``) or their
        names work; they are recorded as JSON so that a saved model can rebuild the encoder.
    strict
        Weights must fit exactly: a model tensor missing from the file, an unused file tensor or a shape mismatch
        raises, listing the names (see :func:`load_weights`). ``False`` loads what matches, with a warning.

    Returns
    -------
    module
        The encoder (built ones in eval mode; a module passed in keeps its mode), mapping normalised ``(B, 3, H, W)`` float images to ``(B, D)``.
    info
        ``name``, ``mean``, ``std``, ``feature_dim`` (None when unknown until a first batch), ``weights_path``,
        ``weights_sha256`` (``""`` without a file), ``pretrained``, ``source`` (``preset``, ``timm``,
        ``hf-hub``, ``registry``, ``module``, ``callable``), ``normalisation`` (where mean/std come from),
        ``weights_load`` (summary of :func:`load_weights`, or ``{}``), and what rebuilds it: ``spec`` (the name
        to pass again), ``preset``, ``arch``, ``encoder_kwargs`` (JSON), ``hf_hub``, ``native_mpp`` (µm/px the
        encoder was trained at, when known), ``strict``.

    Raises
    ------
    FileNotFoundError
        Weights that are not local while the hub is off or unreachable (at once, with how to get them).
    ValueError
        Weights that do not fit the architecture (with ``strict``), an unknown name.

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
        weights_sha = sha256_file(weights_path)
        known = KNOWN_WEIGHTS.get(weights_sha)
        if known is not None and b["preset"] is None:
            norm_mean, norm_std = list(known["mean"]), list(known["std"])
            norm_src = f"known weights file ({known['arch']})"
    if b["pooling"] == "cls+mean":
        module = ClsMeanPool(module)
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
    info = dict(info)
    if mean is not None:
        info["mean"], info["normalisation"] = channel_stats(mean, "mean"), "user"
    if std is not None:
        info["std"], info["normalisation"] = channel_stats(std, "std"), "user"
    return module, info


def _build_named(name: str, pretrained: bool, user_kwargs: dict[str, Any], b: dict[str, Any]) -> Any:
    """Build an encoder from a name (preset, ``hf-hub:``, registered, timm); fill ``b`` with how it was built."""
    import timm

    b["spec"], b["name"] = name, name
    preset = b["preset"] = find_preset(name)
    hub_repo = _split_hub_name(name) if preset is None else None
    if preset is None and hub_repo is None and name not in _REGISTRY:
        _check_timm_name(name)
    if preset is not None:
        if pretrained:  # before building: a missing file fails at once
            b["hub_weights"] = _hub_file(preset.hf_hub, _WEIGHT_FILES, preset.gated, "The weights file")
        kw = {**kwargs_from_json(preset.timm_kwargs), **user_kwargs}
        b["kwargs_json"] = kwargs_to_json({**preset.timm_kwargs, **json.loads(kwargs_to_json(user_kwargs))})
        b.update(
            name=preset.name, source="preset", arch=preset.arch, hub_repo=preset.hf_hub, native_mpp=preset.mpp,
            pooling=preset.pooling, key_format=preset.key_format, ignore_keys=preset.ignore_keys,
            mean=list(preset.mean), std=list(preset.std), norm_src=f"preset {preset.name}",
        )  # fmt: skip
        return timm.create_model(preset.arch, pretrained=False, num_classes=0, **kw)
    if hub_repo is not None:
        cfg = _read_hub_config(hub_repo, gated=None)
        if pretrained:
            b["hub_weights"] = _hub_file(hub_repo, _WEIGHT_FILES, None, "The weights file")
        arch = cfg["architecture"]
        _check_timm_name(arch)
        model_args = dict(cfg.get("model_args") or {})
        model_args.pop("num_classes", None)
        b["kwargs_json"] = kwargs_to_json({**model_args, **json.loads(kwargs_to_json(user_kwargs))})
        b.update(source="hf-hub", arch=arch, hub_repo=hub_repo)
        pcfg = cfg.get("pretrained_cfg") or {}
        if "mean" in pcfg and "std" in pcfg:
            b.update(mean=channel_stats(pcfg["mean"], "mean"), std=channel_stats(pcfg["std"], "std"))
            b["norm_src"] = f"hub config of {hub_repo}"
        return timm.create_model(arch, pretrained=False, num_classes=0, **{**model_args, **user_kwargs})
    if name in _REGISTRY:
        if user_kwargs:
            raise ValueError(f"encoder_kwargs apply to timm models and presets, not to registered encoder {name!r}.")
        reg = _REGISTRY[name]
        factory = reg["factory"]
        accepts = "pretrained" in inspect.signature(factory).parameters
        if pretrained and not accepts:
            raise ValueError(f"Registered encoder {name!r} has no pretrained option.")
        b.update(source="registry", mean=list(reg["mean"]), std=list(reg["std"]), norm_src="registry")
        return factory(pretrained=pretrained) if accepts else factory()
    built = _build_timm(name, pretrained, user_kwargs)
    b.update(source="timm", arch=name, kwargs_json=kwargs_to_json(user_kwargs))
    cfg = getattr(built, "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        b.update(mean=channel_stats(cfg["mean"], "mean"), std=channel_stats(cfg["std"], "std"))
        b["norm_src"] = "timm pretrained_cfg"
    return built


def check_native_scale(info: dict[str, Any], patch_px: int, patch_um: float, rtol: float = 0.25) -> None:
    """Warn when patches are cut at another µm/px than the encoder's native resolution (when it is known).

    Examples
    --------
    >>> check_native_scale({"name": "uni", "native_mpp": 0.5}, 224, 112.0)  # 0.5 µm/px: silent
    """
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
        The encoder record (``model.config["encoder"]`` or ``.uns["agl_embeddings"][key]``).
    weights
        The weights file it was built from, when it records a ``weights_sha256`` (checked). The path recorded is
        never opened: a record is data, not a list of files to open.
    encoder
        The encoder itself (a module, callable, ``(module, info)`` pair or name), for a record of a custom
        module or callable, which cannot be rebuilt from a record.
    what
        How to name the record's owner in messages.

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
    sha = str(rec.get("weights_sha256") or "")
    hub = bool(rec.get("pretrained")) and bool(rec.get("hf_hub") or source == "timm")
    if sha and not hub:
        if weights is None:
            raise FileNotFoundError(
                f"Embedding the slide needs the encoder weights file {what} was trained with (sha256 {sha[:12]}..., "
                f"recorded as {rec.get('weights_path')!r}). Pass weights=<path to that file> (its sha256 is checked) "
                "or embed the slide yourself."
            )
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights={str(weights)!r} is not a file.")
        if sha256_file(weights) != sha:
            raise ValueError(
                f"The weights file {weights} differs from the one {what} was trained with (sha256 {sha[:12]}...)."
            )
    elif weights is not None:
        raise ValueError(
            f"weights={str(weights)!r} was given, but {what}'s encoder ({rec.get('encoder')!r}) was not built from "
            "a weights file (it records no weights_sha256 or used the hub's weights); leave weights out."
        )
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


def record_kwargs(rec: dict[str, Any]) -> dict[str, Any]:
    """The user's part of an encoder record's timm kwargs (a preset applies its own again).

    Examples
    --------
    >>> record_kwargs({"preset": "uni", "encoder_kwargs": '{"img_size": 448, "init_values": 1e-05}'})
    {'img_size': 448}
    """
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
