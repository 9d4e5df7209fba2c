"""Image encoders and spot embeddings.

:func:`get_encoder` turns a name (a registered encoder or any ``timm`` model), a torch module or a plain callable
into a module producing ``(B, D)`` features plus an ``info`` dict (name, normalisation, feature size, weights
file and its sha256). Local weight files load by parameter name, or, when the names differ but the tensors line
up one to one with equal shapes (e.g. the EfficientNet-Lite0 file in ``../shared/weights``), in order.
:func:`embed_patches` runs an encoder over :class:`~agl_scverse.pp.SpotPatches` and caches the features in
``.obsm``. The fine-tune trainer uses the same pieces: ``SpotPatches`` -> :func:`~agl_scverse.pp.normalize`
(with ``info["mean"]``, ``info["std"]``) -> the encoder module.
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
from anndata import AnnData
from scanpy import logging as logg
from torch import nn
from torch.utils.data import DataLoader

from .. import _constants as K
from .._utils import as_anndata, resolve_device, sha256_file
from .patches import IMAGENET_MEAN, IMAGENET_STD, SpotPatches, _channel_stats, normalize

__all__ = ["get_encoder", "register_encoder", "list_encoders", "load_weights", "embed_patches"]

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
    mean, std
        Input normalisation the encoder expects (0-1 range, per RGB channel).
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
    _REGISTRY[name] = {"factory": factory, "mean": _channel_stats(mean, "mean"), "std": _channel_stats(std, "std")}


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
        except Exception as e:  # noqa: BLE001
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
    module.load_state_dict({k: v for k, v in mapping.items()}, strict=False)
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
    mean, std
        Override the input normalisation. Default: the known normalisation of the weights file
        (mean = std = 0.5 for the EfficientNet-Lite0 file), else timm's ``pretrained_cfg``, else the
        registered values, else ImageNet.
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
            info["mean"], info["normalisation"] = _channel_stats(mean, "mean"), "user"
        if std is not None:
            info["std"], info["normalisation"] = _channel_stats(std, "std"), "user"
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
                    norm_mean, norm_std = _channel_stats(cfg["mean"], "mean"), _channel_stats(cfg["std"], "std")
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
        norm_mean, norm_src = _channel_stats(mean, "mean"), "user"
    if std is not None:
        norm_std, norm_src = _channel_stats(std, "std"), "user"
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


# ------------------------------------------------------------------------------------------------ inference
def _features(y: Any, batch: int) -> torch.Tensor:
    if isinstance(y, tuple | list) and y and isinstance(y[0], torch.Tensor):
        y = y[0]
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"The encoder returned {type(y).__name__}; it must return a (B, D) tensor.")
    if y.ndim == 1 and batch == 1:
        y = y[None]
    if y.ndim != 2 or y.shape[0] != batch:
        raise ValueError(
            f"The encoder returned shape {tuple(y.shape)} for a batch of {batch}; it must return (B, D) features. "
            "Add global pooling (timm models built by name already pool)."
        )
    return y


def _encode(
    model: nn.Module, ds: SpotPatches, mean, std, batch_size: int, device, num_workers: int, desc: str
) -> np.ndarray:
    from tqdm.auto import tqdm

    params = list(model.parameters()) + list(model.buffers())
    orig_device = params[0].device if params else None
    was_training = model.training
    loader = DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    out: np.ndarray | None = None
    pos = 0
    model.to(device).eval()
    try:
        with torch.inference_mode(), tqdm(total=len(ds), desc=desc, unit="spot") as bar:
            for batch in loader:
                x = normalize(batch.to(device, non_blocking=True), mean, std)
                y = _features(model(x), len(batch))
                if out is None:
                    out = np.empty((len(ds), y.shape[1]), dtype=np.float32)
                elif y.shape[1] != out.shape[1]:
                    raise ValueError(f"The encoder returned {y.shape[1]} features, then {out.shape[1]}.")
                out[pos : pos + len(batch)] = y.detach().float().cpu().numpy()
                pos += len(batch)
                bar.update(len(batch))
    finally:
        model.train(was_training)
        if orig_device is not None:
            model.to(orig_device)
    assert out is not None and pos == len(ds)
    return out


def _versions() -> dict[str, str]:
    import timm
    import torchvision

    import agl_scverse

    return {
        "agl_scverse": str(getattr(agl_scverse, "__version__", "")),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "timm": str(timm.__version__),
    }


def embed_patches(
    data: Any,
    encoder: str | nn.Module | Callable | tuple[nn.Module, dict] = "resnet18",
    weights: str | Path | None = None,
    pretrained: bool = False,
    patch_px: int = K.DEFAULT_PATCH_PX,
    patch_um: float = K.DEFAULT_PATCH_UM,
    batch_size: int = 32,
    device: str = "auto",
    library_key: str | None = None,
    key_added: str | None = None,
    on_outside: str = "error",
    num_workers: int = 0,
    copy: bool = False,
    *,
    pad_mode: str = "constant",
    min_inside: float = 0.5,
    seed: int = 0,
) -> AnnData | None:
    """Embed spot-centred patches with an image encoder; cache the features in ``.obsm``.

    Patches of ``patch_um`` µm around each spot, resized to ``patch_px`` (see :class:`SpotPatches`), are
    normalised with the encoder's mean/std and run through the encoder in eval mode under
    ``torch.inference_mode``, in batches, with a progress bar.

    Parameters
    ----------
    data
        AnnData in the agl-scverse layout, or a SpatialData (converted with ``agl.io.from_spatialdata``).
    encoder
        Encoder name (registered or any ``timm`` model, random init unless ``weights``/``pretrained``), a torch
        module, a tensor -> tensor callable, or a ``(module, info)`` pair from :func:`get_encoder`.
    weights
        Local state-dict file for the encoder (see :func:`load_weights`); its sha256 is recorded.
    pretrained
        Download timm's pretrained weights (needs the model hub; off by default).
    patch_px, patch_um
        Patch side in pixels and in µm.
    batch_size
        Patches per forward pass.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
    library_key
        ``.obs`` column telling slides apart.
    key_added
        ``.obsm`` key of the features. Default ``"X_agl_<encoder name>"``.
    on_outside
        ``"error"`` or ``"pad"``, for spots whose patch lies mostly outside the image (see :class:`SpotPatches`).
    num_workers
        DataLoader workers cutting patches.
    copy
        Return a new AnnData instead of writing into ``data``.
    pad_mode, min_inside
        Border handling, see :class:`SpotPatches`.
    seed
        Seed of a random-initialised encoder.

    Returns
    -------
    ``None`` (``copy=False``) or a new AnnData (``copy=True``; always the embedded AnnData for a SpatialData
    input). Writes ``.obsm[key]`` (float32, spots x D) and ``.uns["agl_embeddings"][key]``: encoder name, weights
    path and sha256, patch and padding settings, normalisation mean/std, feature_dim, versions. Nothing is
    written when it fails.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> agl.pp.embed_patches(adata, encoder="densenet121", weights="densenet121.pth")  # doctest: +SKIP
    >>> adata.obsm["X_agl_densenet121"].shape  # doctest: +SKIP
    (910, 1024)
    """
    is_anndata = isinstance(data, AnnData)
    adata = as_anndata(data)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int | np.integer) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
    if key_added is not None and (not isinstance(key_added, str) or not key_added):
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    dev = resolve_device(device)
    model, info = get_encoder(encoder, weights=weights, pretrained=pretrained, seed=seed)
    ds = SpotPatches(
        adata,
        patch_px=patch_px,
        patch_um=patch_um,
        library_key=library_key,
        pad_mode=pad_mode,
        min_inside=min_inside,
        on_outside=on_outside,
    )
    key = key_added or f"{K.EMBED_PREFIX}{info['name']}"
    feats = _encode(
        model, ds, info["mean"], info["std"], int(batch_size), dev, int(num_workers), f"embedding ({info['name']})"
    )
    if not np.all(np.isfinite(feats)):
        bad = int((~np.isfinite(feats).all(axis=1)).sum())
        raise ValueError(f"The encoder produced NaN/inf features for {bad} spots; nothing was written.")
    info["feature_dim"] = int(feats.shape[1])
    record = {
        "encoder": info["name"],
        "source": str(info.get("source") or ""),
        "weights_path": str(info.get("weights_path") or ""),
        "weights_sha256": str(info.get("weights_sha256") or ""),
        "weights_load": str((info.get("weights_load") or {}).get("method", "")),
        "pretrained": bool(info.get("pretrained", False)),
        "seed": int(seed),
        "mean": list(info["mean"]),
        "std": list(info["std"]),
        "normalisation": str(info.get("normalisation") or ""),
        "feature_dim": int(feats.shape[1]),
        "n_spots": int(feats.shape[0]),
        "library_key": ds.library_key or "",
        **ds.record(),
        "versions": _versions(),
    }
    target = adata.copy() if copy else adata
    target.obsm[key] = feats
    store = dict(target.uns.get(K.EMBED_UNS, {}) or {})
    store[key] = record
    target.uns[K.EMBED_UNS] = store
    logg.info(f"Added .obsm[{key!r}] ({feats.shape[0]} x {feats.shape[1]}) and .uns[{K.EMBED_UNS!r}][{key!r}].")
    if copy or not is_anndata:
        return target
    return None
