"""Training checkpoints of a running ``agl_fit`` (written atomically by rank 0) and resuming from them."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scanpy import logging as logg

from agl_scverse import _distributed as dist
from agl_scverse._modeldir import atomic_replace, check_overwritable, recover, remove_stale, writer_lock
from agl_scverse._serialize import to_json
from agl_scverse._utils import sha256_file

__all__ = ["CHECKPOINT_FILES", "CHECKPOINT_FORMAT", "Checkpointer", "checkpoint_path"]

MANIFEST_NAME = "checkpoint.json"
STATE_NAME = "state.pt"
#: Every entry a checkpoint directory may hold (the manifest first).
CHECKPOINT_FILES = (MANIFEST_NAME, STATE_NAME)
CHECKPOINT_FORMAT = 1
_SUFFIX = ".checkpoint"


def checkpoint_path(save_dir: str | Path) -> Path:
    """The checkpoint directory of the model directory ``save_dir``, beside it."""
    save_dir = Path(save_dir)
    return save_dir.with_name(save_dir.name + _SUFFIX)


def _read_manifest(path: Path) -> dict | None:
    try:
        with open(path) as fh:
            man = json.load(fh)
    except (OSError, ValueError):
        return None
    return man if isinstance(man, dict) and man.get("agl_checkpoint") == CHECKPOINT_FORMAT else None


def _is_manifest(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and _read_manifest(path) is not None


def _is_intact(path: Path) -> bool:
    man = _read_manifest(path / MANIFEST_NAME)
    return man is not None and (path / STATE_NAME).is_file() and sha256_file(path / STATE_NAME) == man["state_sha256"]


def rng_state() -> dict:
    """The global RNG states of this process (torch CPU and CUDA, Python, NumPy's legacy generator)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    numpy_state = (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss))
    out = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differences(saved: dict, now: dict, limit: int = 8) -> list[str]:
    """``field: checkpoint X, now Y`` for every field (dotted, of nested records) that differs."""
    saved, now = _flat(saved), _flat(now)
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            sa, sb = repr(a), repr(b)
            out.append(
                f"{key}: checkpoint {sa[:80]}{'...' if len(sa) > 80 else ''}, now {sb[:80]}{'...' if len(sb) > 80 else ''}"
            )
    return out[:limit] + ([f"... ({len(out)} fields)"] if len(out) > limit else [])


class Checkpointer:
    """Atomic checkpoints of one run every ``every`` epochs, and the ``state`` a run matching ``fingerprint`` resumes."""

    def __init__(
        self, save_dir: str | Path, every: int, fingerprint: dict, resume: bool = False, overwrite: bool = False
    ):
        self.path = checkpoint_path(save_dir)
        self.every = int(every)
        self.fingerprint = json.loads(json.dumps(to_json(fingerprint)))  # the form it has after a JSON round trip
        self.state: dict | None = None
        self.written = 0
        found: tuple[str | None, bool] = (None, False)
        if dist.is_main():  # rank 0 looks; the others hear what it found (no shared file system needed)
            try:
                with writer_lock(self.path):
                    recover(self.path, _is_intact)  # a swap killed between its renames
                check_overwritable(self.path, CHECKPOINT_FILES, _is_manifest)
                found = (None, self.path.is_dir() and any(self.path.iterdir()))
            except FileExistsError as err:
                found = (str(err), False)
        error, exists = dist.broadcast_object(found)
        if error is not None:
            raise FileExistsError(error)
        if exists and not resume and not overwrite:
            raise FileExistsError(
                f"{self.path} holds the checkpoint of an unfinished run; pass resume=True to continue it, or "
                "overwrite=True to start over (it is replaced by the new run's checkpoints)."
            )
        if exists and resume:
            self.state = self._load()
        elif resume:
            logg.info(f"resume=True but there is no checkpoint at {self.path}: training from the first epoch.")

    def _load(self) -> dict:
        """Rank 0 reads and checks the checkpoint; every rank receives it."""
        out: tuple[dict | None, str | None] = (None, None)
        if dist.is_main():
            try:
                out = (self._read(), None)
            except (OSError, ValueError, RuntimeError) as err:
                out = (None, str(err))
        state, error = dist.broadcast_object(out)
        if error is not None:
            raise ValueError(error)
        return state

    def _read(self) -> dict:
        man = _read_manifest(self.path / MANIFEST_NAME)
        if man is None:
            raise ValueError(f"{self.path / MANIFEST_NAME} is not an AGL checkpoint manifest; remove {self.path}.")
        if (actual := sha256_file(self.path / STATE_NAME)) != man.get("state_sha256"):
            raise ValueError(
                f"{self.path / STATE_NAME} is damaged (sha256 {actual}, the manifest records "
                f"{man.get('state_sha256')}); remove {self.path} and train again, or pass overwrite=True."
            )
        if man.get("fingerprint") != self.fingerprint:
            diff = "; ".join(_differences(man.get("fingerprint") or {}, self.fingerprint))
            raise ValueError(
                f"The checkpoint at {self.path} was written by a run with other settings or data ({diff}); resume "
                "with the same arguments and data (expression_sha256: the expression of the training and validation "
                "spots, in order; features_sha256: their embedding; split_sha256: which spots), or pass "
                "resume=False, overwrite=True to start a new run."
            )
        with open(self.path / STATE_NAME, "rb") as fh:
            state = torch.load(fh, map_location="cpu", weights_only=True)
        if int(man.get("world_size", 1)) != dist.world_size():
            logg.warning(
                f"The checkpoint was written by {man.get('world_size')} process(es), this run has "
                f"{dist.world_size()}: the global batches are the same, per-process random streams (dropout, "
                "augmentation) are not, so the result will not be bit-identical to an uninterrupted run."
            )
        logg.info(f"Resuming from {self.path} after epoch {man['epoch']}.")
        return state

    def rank_rng(self) -> dict | None:
        """The global RNG state this rank had when the checkpoint was written (rank 0's for a new rank)."""
        if self.state is None:
            return None
        states = self.state["rng"]
        return states[dist.rank()] if dist.rank() < len(states) else states[0]

    def due(self, epochs_done: int) -> bool:
        """Whether a checkpoint is written after ``epochs_done`` completed epochs."""
        return self.every > 0 and epochs_done % self.every == 0

    def save(self, state: dict) -> None:
        """Write ``state`` (``epoch`` = epochs completed) atomically; every rank calls it, rank 0 writes."""
        state = {**state, "rng": dist.all_gather_object(rng_state())}
        if dist.is_main():
            buf = io.BytesIO()
            torch.save(state, buf)
            blob = buf.getvalue()

            def write(tmp: Path) -> None:
                with open(tmp / STATE_NAME, "wb") as fh:
                    fh.write(blob)
                man = {
                    "agl_checkpoint": CHECKPOINT_FORMAT, "epoch": int(state["epoch"]), "world_size": dist.world_size(),
                    "fingerprint": self.fingerprint, "state_sha256": sha256_file(tmp / STATE_NAME),
                }  # fmt: skip
                with open(tmp / MANIFEST_NAME, "w") as fh:
                    json.dump(man, fh, indent=1)

            with writer_lock(self.path):
                remove_stale(self.path)
                atomic_replace(self.path, write, overwrite=True, files=CHECKPOINT_FILES, is_ours=_is_manifest)
        self.written += 1
        dist.barrier()

    def remove(self) -> None:
        """Delete the checkpoint (after the final model is saved); rank 0 does it."""
        import shutil

        if dist.is_main() and self.path.is_dir():
            check_overwritable(self.path, CHECKPOINT_FILES, _is_manifest)
            shutil.rmtree(self.path)
            remove_stale(self.path)
        dist.barrier()
