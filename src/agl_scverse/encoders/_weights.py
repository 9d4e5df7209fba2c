"""Local weight files into an encoder: read, unwrapped, renamed (transformers DINOv2 to timm), matched, checked."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from scanpy import logging as logg
from torch import nn

from agl_scverse._utils import sha256_file

from ._normalize import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["KNOWN_WEIGHTS", "load_weights", "weights_sha256"]


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


_CLASSIFIER_KEY = re.compile(r"(^|\.)(_?fc|classifier|last_linear|head)(\.fc)?\.(weight|bias)$")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


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

    Tensors are matched by name, else in order when the file's (less classifier layers the model lacks, which
    are dropped and listed) line up one to one with the model's with equal shapes; ``num_batches_tracked`` is
    ignored.

    Parameters
    ----------
    module
        The encoder.
    path
        ``.safetensors``, ``.bin``, ``.pth`` or ``.pt`` state dict (also inside ``{"state_dict": ...}``).
    strict
        A missing, unused or misshapen tensor is an error naming them (default); ``False`` loads what matches.
    key_format
        ``"timm"``, or ``"hf-dinov2"`` (transformers ``Dinov2Model`` names, position embedding resampled).
    ignore_keys
        Patterns (``re.search``) of file tensors to leave out on purpose (e.g. ``"mask_token"``).

    Returns
    -------
    A summary: ``method`` (``"name"`` or ``"order"``), counts and the names missing, unused or dropped.

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
            known = KNOWN_WEIGHTS.get(weights_sha256(path))
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


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, identity: tuple[int, ...]) -> str:
    return sha256_file(path)


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file, hashed once while it stays the same file (device, inode, size, change times)."""
    st = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
