"""timm models by name: the name checked (close names), cached pretrained weights via ``pretrained_cfg_overlay``."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._hub import cached_file, hub_offline, hub_reachable
from ._presets import PRESETS
from ._registry import REGISTRY

__all__ = ["build_timm", "check_timm_name"]


def check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models() + list(REGISTRY) + list(PRESETS), n=5)
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
        repo, _, rev = str(hub_id).partition("@")
        got = cached_file(repo, ("model.safetensors", "pytorch_model.bin"), rev or None)
        if got is not None:
            return got
    url = cfg.get("url")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(str(url).split("?")[0]).name
        if cached.is_file():
            return str(cached)
    return None


def build_timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """A timm model by name (``num_classes=0``); pretrained weights from a local cache, else the hub, else fast error."""
    import timm

    check_timm_name(name)
    kw = {"num_classes": 0, **kwargs}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kw)
    probe = timm.create_model(name, pretrained=False, **kw) if torch.get_default_device().type != "meta" else None
    local = _timm_pretrained_file(probe) if probe is not None else None
    if local is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": local}, **kw)
    if not hub_reachable():
        cfg = getattr(probe, "pretrained_cfg", None) or {}
        where = cfg.get("hf_hub_id") or cfg.get("url") or name
        raise FileNotFoundError(
            f"pretrained=True: timm's weights of {name!r} ({where}) are not in the local cache and the hub is "
            f"{'switched off (HF_HUB_OFFLINE is set)' if hub_offline() else 'not reachable'}. On a machine with "
            "internet, run timm.create_model(name, pretrained=True) once (fills ~/.cache/huggingface or the torch "
            "hub cache) and copy the cache, or save the state dict and pass weights='/path/to/file'."
        )
    return timm.create_model(name, pretrained=True, **kw)
