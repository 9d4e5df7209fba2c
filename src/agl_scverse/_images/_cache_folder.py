"""The folder of decoded images: where it is, that it is private, locks between processes, whole-file writes."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "CACHE_ENV",
    "NOFOLLOW",
    "cache_dir",
    "file_lock",
    "map_npy",
    "private_folder",
    "prune_stale",
    "write_text_atomic",
]


#: Environment variable naming the folder of decoded-image cache files.
CACHE_ENV = "AGL_SCVERSE_CACHE"


def cache_dir() -> Path:
    """Folder of the decoded-image cache: ``$AGL_SCVERSE_CACHE``, else ``agl_scverse_cache-<uid>`` in the temp folder."""
    value = os.environ.get(CACHE_ENV)
    if value and value.strip():
        return Path(value).expanduser()
    suffix = f"-{os.getuid()}" if hasattr(os, "getuid") else ""  # one folder per user on shared machines
    return Path(tempfile.gettempdir()) / f"agl_scverse_cache{suffix}"


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def private_folder(folder: Path) -> Path:
    """``folder``, created 0700 when missing; refused unless it is a real folder of this user writable by no one else."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"Cannot create the image cache folder {folder} ({e}); set {CACHE_ENV} to a writable folder."
        ) from e
    if not hasattr(os, "geteuid"):  # Windows: no owner check
        return folder
    st = os.lstat(folder)
    problem = ""
    if not stat.S_ISDIR(st.st_mode):
        problem = "is a link, not a folder" if stat.S_ISLNK(st.st_mode) else "is not a folder"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to another user (uid {st.st_uid}, you are {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"can be written by others (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        raise PermissionError(
            f"The image cache folder {folder} {problem}: a file placed there by someone else would be read as "
            f"pixels. Set {CACHE_ENV} to a folder of your own that only you can write (e.g. ~/.cache/agl_scverse)."
        )
    return folder


def map_npy(path: Path) -> np.ndarray | None:
    """A read-only memory map of the ``.npy`` file ``path`` (not followed if a link; ours only), or None if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a link
        raise PermissionError(f"Cache file {path} is a link or cannot be opened ({e}); delete it.") from e
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
            raise PermissionError(f"Cache file {path} is not a regular file of yours; delete it.")
        fmt = np.lib.format
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(fh))
        if read_header is None:
            return None
        shape, fortran, dtype = read_header(fh)
        if fortran or dtype != np.uint8:
            return None
        return np.memmap(fh, dtype=dtype, mode="r", shape=shape, offset=fh.tell())


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _is_stale(meta: Path) -> bool:
    """Whether the record ``meta`` names a source image that is gone or was replaced (False if unreadable)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        rec = json.loads(meta.read_text())
        try:
            st = os.stat(rec["path"])
        except FileNotFoundError:
            return True
        return (int(st.st_size), int(st.st_mtime_ns)) != (int(rec["size"]), int(rec["mtime_ns"]))
    return False


def prune_stale(folder: Path) -> None:
    """Delete cache files whose source image is gone or was replaced (their ``.json`` records path, size, mtime).

    A stale entry is checked again under its lock, taken without waiting: an entry being written (its lock held, in
    this process too) is left alone, and one another process rewrote since the first look is kept.
    """
    from filelock import FileLock, Timeout

    for meta in folder.glob("*.json"):
        if not _is_stale(meta):
            continue
        npy = meta.with_suffix(".npy")
        held = FileLock(npy.with_name(npy.name + ".lock"), mode=0o600, timeout=0)
        try:
            held.acquire()
        except (Timeout, OSError):
            continue
        try:
            if _is_stale(meta):
                for path in (npy, meta, npy.with_name(npy.name + ".lock")):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        finally:
            held.release()


@contextlib.contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """An exclusive :class:`filelock.FileLock` next to ``target`` (it follows no link since 3.20.1)."""
    from filelock import FileLock

    lock = target.with_name(target.name + ".lock")
    held = FileLock(lock, mode=0o600)
    try:
        held.acquire()
    except OSError as e:
        raise PermissionError(f"Cannot open the cache lock {lock} ({e}); if it is a link, delete it.") from e
    try:
        yield
    finally:
        held.release()
