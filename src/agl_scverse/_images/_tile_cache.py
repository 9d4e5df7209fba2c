"""The process-wide LRU cache of decoded TIFF tiles, with a byte budget (``AGL_SCVERSE_TILE_CACHE_MB``)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

__all__ = ["DEFAULT_TILE_CACHE_MB", "TILE_CACHE_ENV", "TileCache", "tile_cache"]


#: Environment variable with the byte budget of the tile cache, in MB.
TILE_CACHE_ENV = "AGL_SCVERSE_TILE_CACHE_MB"
DEFAULT_TILE_CACHE_MB = 256


class TileCache:
    """A thread-safe LRU cache of decoded tiles within ``max_bytes`` (0 disables it); larger items are not kept."""

    def __init__(self, max_bytes: int = DEFAULT_TILE_CACHE_MB * 2**20):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.nbytes = 0  # never above max_bytes
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> np.ndarray | None:
        """The cached array for ``key`` (marked as recently used), or None."""
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key: Hashable, arr: np.ndarray) -> None:
        """Keep ``arr`` under ``key``, evicting the least recently used items beyond the budget."""
        with self._lock:
            old = self._items.pop(key, None)
            self.nbytes -= 0 if old is None else int(old.nbytes)
            if arr.nbytes <= self.max_bytes:
                self._items[key] = arr
                self.nbytes += int(arr.nbytes)
                self._evict()

    def resize(self, max_bytes: int) -> None:
        """Change the budget (evicting as needed)."""
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._items:
            self.nbytes -= int(self._items.popitem(last=False)[1].nbytes)

    def clear(self) -> None:
        """Drop every item and reset the hit counters."""
        with self._lock:
            self._items.clear()
            self.nbytes = self.hits = self.misses = 0

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at fork time would never be released


def _budget_from_env() -> int:
    value = os.environ.get(TILE_CACHE_ENV)
    if value is None or not value.strip():
        return DEFAULT_TILE_CACHE_MB * 2**20
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"{TILE_CACHE_ENV}={value!r} must be a number of MB >= 0 (e.g. 256).")
    return int(mb * 2**20)


_TILE_CACHE = TileCache(_budget_from_env())
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_TILE_CACHE._after_fork)


def tile_cache() -> TileCache:
    """The process-wide cache of decoded TIFF tiles (``AGL_SCVERSE_TILE_CACHE_MB``, default 256 MB)."""
    return _TILE_CACHE
