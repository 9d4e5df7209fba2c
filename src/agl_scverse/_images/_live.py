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
    """A token naming an in-memory image object (e.g. a SpatialData image element) for :func:`live_image`.

    The object is held by a weak reference: the token resolves while the object lives (e.g. while its SpatialData
    does) and to None afterwards, so an AnnData can name a full-resolution image without copying it into ``.uns``
    (the token is a plain string, h5ad-serialisable). Registering the same object again gives the same token.

    Examples
    --------
    >>> import xarray as xr, numpy as np
    >>> img = xr.DataArray(np.zeros((3, 4, 4), np.uint8), dims=("c", "y", "x"))
    >>> live_image(register_live_image(img)) is img
    True
    """
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
