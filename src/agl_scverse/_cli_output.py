"""Output files of the command line: paths checked before any work, ``.h5ad`` files written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

from ._cli_messages import one_line


def check_output(path: str | Path, flag: str, overwrite: bool = False, folder: bool = False) -> Path:
    """Check an output path before any work: where it goes exists and is writable, and it is new or ``overwrite``."""
    p = Path(path)
    parent = p.absolute().parent
    if not folder and not parent.is_dir():
        raise FileNotFoundError(f"{flag} {p}: the folder {parent} does not exist; create it or choose another path.")
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{flag} {p}: {ancestor} is a file, not a folder; choose another path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {p}: cannot write in {ancestor}; choose another path.")
    if p.exists():
        if folder and not p.is_dir():
            raise FileExistsError(f"{flag} {p} exists and is a file, not a model folder; choose another path.")
        if not folder and p.is_dir():
            raise IsADirectoryError(f"{flag} {p} is a folder; pass a file path.")
        if not overwrite:
            raise FileExistsError(f"{flag} {p} already exists; pass --overwrite to replace it or choose another path.")
    return p


def write_h5ad(adata, path: Path) -> None:
    """Write through a temporary file beside ``path``, so a failed write leaves an existing file as it was."""
    import uuid

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.h5ad")
    try:
        if hasattr(os, "fork"):
            _write_in_child(adata, tmp, path)
        else:  # pragma: no cover - Windows
            adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_in_child(adata, tmp: Path, path: Path) -> None:
    """``adata.write_h5ad(tmp)`` in a forked process; its failure (an error or a crash) raises ``OSError`` here."""
    import signal
    import warnings

    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded process": the child only writes
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child (its coverage is not collected)
        code = 1
        try:
            os.close(r)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # HDF5's own error dumps: the parent says it in one line
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over a file-size limit: an error, not a kill
            adata.write_h5ad(tmp)
            code = 0
        except BaseException as e:
            os.write(w, one_line(e).encode(errors="replace")[:2000])
        finally:
            os._exit(code)  # no interpreter teardown: HDF5 objects are not flushed again
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        message = fh.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        why = message or (f"the writer died of signal {-code}" if code < 0 else f"the writer exited with {code}")
        raise OSError(
            f"could not write {path} ({why}); check the free space and the file-size limit (ulimit -f) there. "
            "Nothing was written."
        )
