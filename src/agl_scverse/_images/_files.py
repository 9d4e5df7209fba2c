"""Image files opened safely: regular files only, a file's identity, reopening after pickling or a fork, PIL."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

from ._source import ImageSource

__all__ = ["FileSource", "check_regular_file", "open_pil"]


def check_regular_file(path: str | os.PathLike, label: str | None = None) -> os.stat_result:
    """``os.stat`` of an image file; refuses a missing path, a folder, a FIFO, a device or a socket."""
    label = label or str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file {path} not found. Move it back or fix the path.") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a folder, not an image file.")
    if not stat.S_ISREG(st.st_mode):
        kind = next(
            (n for test, n in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                               (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")) if test(st.st_mode)),
            "special file",
        )  # fmt: skip
        raise ValueError(
            f"{label} is a {kind}, not a regular image file; refusing to read it. Point the image path at the "
            "image file itself."
        )
    return st


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """Device, inode, size, modification and change time: the change time moves with any rewrite of the file."""
    return (int(st.st_dev), int(st.st_ino), int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns))


class FileSource(ImageSource):
    """A source backed by a regular file: remembers its identity, reopens lazily (after pickling or a fork)."""

    def __init__(self, path: str | Path, name: str | None = None):
        path = Path(path)
        st = check_regular_file(path, name)
        self.path = str(path.resolve())
        self.file_size, self.mtime_ns = int(st.st_size), int(st.st_mtime_ns)
        self.identity = _identity(st)
        self._pid: int | None = None
        self._label = name or f"image file {self.path}"

    @property
    def file_key(self) -> tuple:
        """``(resolved path, device, inode, size, mtime_ns, ctime_ns)``: what the in-process caches are keyed by."""
        return (self.path, *self.identity)

    def _check_unchanged(self) -> None:
        try:
            st = check_regular_file(self.path, self._label)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Image file {self.path} disappeared after it was opened. Move it back or open the image again."
            ) from None
        if _identity(st) != self.identity:
            raise RuntimeError(
                f"Image file {self.path} changed since it was opened (its size, modification or change time, or the "
                "file itself differ); open it again (e.g. build a new SpotPatches) to read the new pixels."
            )

    def _handles_valid(self) -> bool:
        return self._pid == os.getpid()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in self._handle_attrs:
            state[key] = None
        state["_pid"] = None
        return state

    _handle_attrs: tuple[str, ...] = ()


_PIL_LOCK = threading.Lock()


def open_pil(path: str | os.PathLike) -> Any:
    """``PIL.Image.open(path)`` with PIL's decompression-bomb limit lifted while this call reads the header."""
    from PIL import Image

    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old
