"""In-memory images named by a token (a SpatialData image held by the process), so `.uns` never holds a copy."""

from __future__ import annotations

import threading
import uuid
import weakref
from typing import Any

__all__ = ["live_image", "register_live_image"]


_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LIVE_LOCK = threading.Lock()


def register_live_image(obj: Any) -> str:
    """A string token for :func:`live_image` naming ``obj`` by a weak reference (the same token for the same object)."""
    with _LIVE_LOCK:
        for token, value in _LIVE.items():
            if value is obj:
                return token
        token = f"live-{uuid.uuid4().hex}"
        _LIVE[token] = obj
        return token


def live_image(token: str | None) -> Any:
    """The object registered under ``token`` by :func:`register_live_image`, or None when it is gone."""
    if not token:
        return None
    with _LIVE_LOCK:
        return _LIVE.get(str(token))
