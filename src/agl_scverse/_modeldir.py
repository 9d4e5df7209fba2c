"""A model directory on disk: what may be overwritten, the atomic swap, and recovery after a crash.

A model directory holds exactly :data:`MODEL_FILES` (``config.json`` and ``model.safetensors``) and nothing else.
:func:`check_overwritable` accepts a missing path, an empty directory, or a directory whose entries are a subset
of :data:`MODEL_FILES` with a ``config.json`` that is a JSON object listing ``genes``; anything else (a file, a
link, a folder with other entries, a foreign ``config.json``) is refused, so ``overwrite=True`` never deletes
data that is not a model of ours.

:func:`atomic_replace` writes the new model into ``.<name>.tmp-XXXXXXXX`` beside ``path`` (files and folder
fsynced), renames an existing model to ``.<name>.old-XXXXXXXX``, renames the temporary to ``path``, fsyncs the
parent and removes the old one. The new folder and files get the usual permissions of new files (0755 and 0644
under a 0022 umask), not the private 0700 of a temporary folder. A process killed at any point leaves either the old or the new model at
``path``, or (between the two renames) none at ``path`` and an intact one in a leftover: :func:`recover` moves
it back (the old model first: an unfinished save does not count), and the next save removes stale leftovers.
Writers of one folder take turns: :func:`writer_lock` holds an exclusive ``flock`` on the parent folder for a whole
save (recovery, removal of stale leftovers, the swap), so two processes saving to one path never delete each
other's temporary (the last one to finish wins, or ``overwrite=False`` refuses with ``FileExistsError``), and a
reader that finds no model at ``path`` recovers one only while no save is under way. Readers take no lock: they
read one generation through one directory handle (see :meth:`agl_scverse.model.AGLModel.load`).

The same machinery writes a training checkpoint (:mod:`agl_scverse.train._resume`): ``files`` names the entries
such a directory holds and ``is_ours`` recognises its manifest, so neither kind of directory can overwrite the other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from scanpy import logging as logg

__all__ = [
    "CONFIG_NAME",
    "MODEL_FILES",
    "WEIGHTS_NAME",
    "atomic_replace",
    "check_overwritable",
    "leftovers",
    "recover",
    "writer_lock",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Every entry a model directory may hold.
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME)
_KINDS = ("tmp", "old")


@contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the parent folder of ``path`` (POSIX ``flock``; a no-op where there is none).

    Saves to one folder take turns. Not re-entrant: never nest two of these in one thread.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: renames alone
        yield
        return
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # no parent yet (a reader then finds nothing) or not openable
        yield
        return
    try:
        with suppress(OSError):  # a file system without flock: renames alone, as before
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where directories cannot be opened."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_permissions(path: Path, files: tuple[str, ...] = MODEL_FILES) -> None:
    """Give the folder ``path`` and its ``files`` the permissions of a new folder / file (0777 / 0666 less umask).

    ``tempfile.mkdtemp`` creates 0700 folders, so a model written through one would be readable by its owner only.
    """
    mask = _umask()
    for name in files:
        os.chmod(path / name, 0o666 & ~mask)
    os.chmod(path, 0o777 & ~mask)


def _describe(path: Path, limit: int = 10) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def check_overwritable(
    path: Path, files: tuple[str, ...] = MODEL_FILES, is_ours: Callable[[Path], bool] | None = None
) -> None:
    """Raise ``FileExistsError`` unless ``path`` is absent, empty, or a model directory of ours (see module doc).

    ``files`` (default :data:`MODEL_FILES`) are the entries the directory may hold, the first one its manifest,
    which ``is_ours`` (default: a JSON object listing ``genes``) must accept.
    """
    is_ours = is_ours or _is_our_config
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        kind = "a symbolic link" if path.is_symlink() else "a file"
        raise FileExistsError(f"{path} is {kind}, not a model directory; not overwriting it. Choose another path.")
    names = {p.name for p in path.iterdir()}
    if not names:
        return
    problem = ""
    if other := sorted(names - set(files)):
        problem = f"entries other than {' and '.join(files)}: {', '.join(other[:10])}"
    elif folders := sorted(n for n in names if (path / n).is_dir()):
        problem = f"{', '.join(folders)} is a folder"
    elif not is_ours(path / files[0]):
        problem = f"{files[0]} is missing or not an AGL {'model config' if files == MODEL_FILES else 'manifest'}"
    if problem:
        what = "a saved AGL model" if files == MODEL_FILES else "an AGL training checkpoint"
        raise FileExistsError(
            f"{path} is not {what} ({problem}; it holds {_describe(path)}); not overwriting it. "
            "Remove it yourself or choose another path."
        )


def _is_our_config(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("genes"), list)


def leftovers(path: Path) -> list[tuple[str, Path]]:
    """``(kind, dir)`` of the temporaries of earlier saves to ``path`` (``kind``: ``"tmp"`` or ``"old"``), newest first."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.({'|'.join(_KINDS)})-[A-Za-z0-9_]{{8}}$")
    if not path.parent.is_dir():
        return []
    found = []
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append((m.group(1), p))
    return sorted(found, key=lambda kp: kp[1].stat().st_mtime, reverse=True)


def recover(path: Path, is_intact: Callable[[Path], bool]) -> Path | None:
    """Move an intact model left beside ``path`` by an interrupted save back to ``path``, when none is there.

    The old model (``.old-*``) is preferred: the save that wrote the temporary did not finish. Returns the
    directory restored, or None.
    """
    if path.is_symlink() or (path.exists() and (not path.is_dir() or any(path.iterdir()))):
        return None  # something is at path (a model or not): nothing to restore
    found = leftovers(path)
    for kind in ("old", "tmp"):
        for k, candidate in found:
            if k == kind and is_intact(candidate):
                if path.exists():
                    path.rmdir()  # empty
                os.rename(candidate, path)
                fsync_dir(path.parent)
                logg.warning(
                    f"{path} was missing after an interrupted save; restored the "
                    f"{'previous' if kind == 'old' else 'completely written new'} model from {candidate.name}."
                )
                return candidate
    return None


def remove_stale(path: Path) -> None:
    """Remove the leftovers of earlier saves to ``path`` (call when ``path`` holds a model or none is recoverable)."""
    for _, p in leftovers(path):
        shutil.rmtree(p, ignore_errors=True)


def atomic_replace(
    path: Path,
    write: Callable[[Path], None],
    overwrite: bool,
    files: tuple[str, ...] = MODEL_FILES,
    is_ours: Callable[[Path], bool] | None = None,
) -> Path:
    """Write a model with ``write(tmp_dir)`` and move it to ``path`` (see module doc); return ``path``.

    ``files`` and ``is_ours``: see :func:`check_overwritable` (``write`` must create every one of ``files``).
    """
    check_overwritable(path, files, is_ours)  # first: overwrite=True would not help for anything but a model
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it or choose another path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        write(tmp)
        publish_permissions(tmp, files)
        for name in files:
            fsync_file(tmp / name)
        fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            old.rmdir()
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if old is not None and old.exists() and not path.exists():
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)
    return path
