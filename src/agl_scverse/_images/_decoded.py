"""JPEG, PNG and other PIL formats, decoded once into a memory-mapped ``.npy`` named after the file's content."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from agl_scverse._utils import sha256_file

from ._cache_folder import (
    CACHE_ENV,
    NOFOLLOW,
    cache_dir,
    file_lock,
    map_npy,
    private_folder,
    prune_stale,
    write_text_atomic,
)
from ._files import FileSource, open_pil
from ._source import ImageSource, Level

__all__ = ["DecodedFileSource"]


_GRAY_MODES = ("1", "L", "LA", "La", "I", "F")


class DecodedFileSource(FileSource):
    """A JPEG / PNG (any PIL format) decoded once into ``<cache_folder>/<name>-<sha256 of the file>.npy``, memory-mapped."""

    kind = "decoded"
    _handle_attrs = ("_mmap",)

    def __init__(self, path: str | Path, name: str | None = None, cache_folder: str | Path | None = None):
        from PIL import UnidentifiedImageError

        FileSource.__init__(self, path, name)
        try:
            with open_pil(self.path) as im:
                (width, height), mode = im.size, im.mode
        except UnidentifiedImageError as e:
            raise ValueError(
                f"{self._label} is not an image format agl-scverse reads (PIL and tifffile cannot open it). "
                "Convert it to TIFF, JPEG or PNG."
            ) from e
        if mode in _GRAY_MODES or mode.startswith("I;16"):
            raise ValueError(f"{self._label} is grayscale (mode {mode}); an RGB H&E image is required.")
        ImageSource.__init__(self, self._label, [Level(int(width), int(height), 1.0)], np.uint8)
        self.mode = mode
        self.cache_folder = str(cache_folder) if cache_folder is not None else None
        self._mmap: np.ndarray | None = None
        self._sha256: str | None = None

    @property
    def content_sha256(self) -> str:
        """sha256 of the image file (read once per file identity)."""
        if self._sha256 is None:
            self._check_unchanged()
            key = self.file_key
            with _HASH_LOCK:
                digest = _HASHES.get(key)
            if digest is None:
                digest = self._recorded_sha256()
            if digest is None:
                digest = sha256_file(self.path)
                self._check_unchanged()  # not rewritten while it was hashed
                self._record_sha256(digest)
            with _HASH_LOCK:
                _HASHES[key] = digest
            self._sha256 = digest
        return self._sha256

    @property
    def _folder(self) -> Path:
        return Path(self.cache_folder) if self.cache_folder is not None else cache_dir()

    def _hash_record(self) -> Path:
        """Where the content hash of this file identity is kept, for other processes."""
        return self._folder / f".id-{hashlib.sha256(repr(self.file_key).encode()).hexdigest()[:32]}.sha256"

    def _recorded_sha256(self) -> str | None:
        try:
            private_folder(self._folder)
            fd = os.open(self._hash_record(), os.O_RDONLY | NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd) as fh:
            text = fh.read(65).strip()
        return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None

    def _record_sha256(self, digest: str) -> None:
        with contextlib.suppress(OSError):
            private_folder(self._folder)
            write_text_atomic(self._hash_record(), digest)

    @property
    def cache_path(self) -> Path:
        """The ``.npy`` file holding the decoded pixels (named after the sha256 of the file's content)."""
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(self.path).stem)[:60]
        return self._folder / f"{stem}-{self.content_sha256[:32]}.npy"

    def _array(self) -> np.ndarray:
        if self._mmap is not None and self._handles_valid():
            return self._mmap
        target = self.cache_path
        private_folder(target.parent)
        arr = map_npy(target)
        if arr is None:
            self._check_unchanged()
            with file_lock(target):
                arr = map_npy(target)  # another process may have written it while we waited
                if arr is None:
                    self._decode_to(target)
                    arr = map_npy(target)
        if arr is None or arr.shape != (self.height, self.width, 3) or arr.dtype != np.uint8:
            raise RuntimeError(f"Cache file {target} does not match {self.path}; delete it and read again.")
        self._mmap, self._pid = arr, os.getpid()
        return arr

    def _decode_to(self, target: Path) -> None:
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npy")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.height, self.width, 3)}  # fmt: skip
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                np.lib.format.write_array_header_1_0(fh, header)
                if hasattr(os, "posix_fallocate"):  # the whole file now: a full disk fails here, not as SIGBUS later
                    os.posix_fallocate(fh.fileno(), 0, fh.tell() + self.height * self.width * 3)
                with open_pil(self.path) as im:
                    if im.mode not in ("RGB", "RGBA"):
                        im = im.convert("RGB")
                    im.load()  # the one full decode
                    band = max(1, (1 << 22) // max(self.width, 1))  # copy in bands of ~4 M pixels
                    for y in range(0, self.height, band):
                        y1 = min(y + band, self.height)
                        fh.write(np.ascontiguousarray(np.asarray(im.crop((0, y, self.width, y1)))[..., :3]).tobytes())
            os.replace(tmp, target)
            rec = {"path": self.path, "size": self.file_size, "mtime_ns": self.mtime_ns}
            write_text_atomic(target.with_suffix(".json"), json.dumps(rec))
        except OSError as e:
            raise OSError(
                e.errno,
                f"Could not write the decoded copy of {self.path} ({self.height} x {self.width} px, "
                f"{self.height * self.width * 3 / 2**20:.0f} MB) to the image cache {target.parent}: {e.strerror or e}. "
                f"Free space there or set {CACHE_ENV} to a folder with room; nothing was left behind.",
            ) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        prune_stale(target.parent)

    def _raw(self, level: int, xa: int, ya: int, xb: int, yb: int) -> np.ndarray:
        return self._array()[ya:yb, xa:xb]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self._array()
        return arr if dtype is None else arr.astype(dtype)

    def close(self) -> None:
        """Drop the memory map."""
        self._mmap = None


_HASHES: dict[tuple, str] = {}  # file identity -> sha256 of its content, for this process
_HASH_LOCK = threading.Lock()
