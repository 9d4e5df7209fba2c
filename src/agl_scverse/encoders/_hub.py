"""The Hugging Face hub: offline switches, one quick reachability probe, files from the local cache first."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "WEIGHT_FILES",
    "cached_file",
    "hub_file",
    "hub_offline",
    "hub_reachable",
    "read_hub_config",
    "split_hub_name",
]


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


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


def hub_reachable(timeout: float = 2.0) -> bool:
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
    gate = {True: "It is gated: ", None: "If it is gated: ", False: ""}[gated]
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


def cached_file(repo: str, names: Sequence[str], revision: str | None = None) -> str | None:
    """Path of the first of ``names`` in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    for n in names:
        got = try_to_load_from_cache(repo, n, revision=revision)
        if isinstance(got, str) and Path(got).is_file():
            return got
    return None


def hub_file(repo: str, names: Sequence[str], gated: bool | None, what: str) -> str:
    """Path of the first of ``names`` in the local cache; downloaded when the hub is reachable; else a fast error."""
    got = cached_file(repo, names)
    if got is not None:
        return got
    if not hub_reachable():
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


def split_hub_name(name: str) -> str | None:
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.lower().startswith(prefix):
            repo = name[len(prefix) :].strip()
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
                raise ValueError(f"{name!r} is not a hub name of the form 'hf-hub:<organisation>/<model>'.")
            return repo
    return None


def read_hub_config(repo: str, gated: bool | None) -> dict[str, Any]:
    path = hub_file(repo, ("config.json",), gated, "The timm config (config.json)")
    with open(path) as fh:
        cfg = json.load(fh)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise ValueError(
            f"{repo!r}: config.json names no timm 'architecture'; it is not a timm model (transformers models "
            "need their own loader). Build the module yourself and pass it as encoder=."
        )
    return cfg
