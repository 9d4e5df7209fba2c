"""Multi-process runs with plain :mod:`torch.distributed` under ``torchrun``; every helper is a no-op alone.

Every rank runs the same program on the same data and seed; :func:`shard` gives a rank its strided share of a
global batch, :func:`sum_autograd` sums loss statistics over ranks with gradients, and rank 0 (:func:`is_main`)
writes files. See ``docs/scaling_out.md``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "check_batch_size",
    "env_world_size",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_rank",
    "loss_reduce",
    "mean_",
    "rank",
    "shard",
    "sum_autograd",
    "world_size",
    "wrap_ddp",
]

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """The rank of this process (0 alone)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 alone)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int:
    """``LOCAL_RANK`` set by ``torchrun`` (0 when absent): the GPU of this process on its node."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group of ``torchrun``'s environment (NCCL with CUDA, else gloo); whether it is distributed.

    Examples
    --------
    >>> init_from_env()  # a plain python process
    False
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if env_world_size() <= 1:
        return False
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={env_world_size()} is set but {', '.join(missing)} is not: start distributed runs with "
            "torchrun (e.g. `torchrun --nproc_per_node 2 -m agl_scverse.cli fit --distributed ...`)."
        )
    if not dist.is_available():
        raise RuntimeError("This torch build has no torch.distributed; run in one process (without torchrun).")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return is_distributed()


def _collective_device() -> torch.device:
    """Where tensors of a collective must live: this rank's GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if is_distributed():
        dist.barrier()


def sum_autograd(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks with gradients, so a loss of such sums under DDP is that of the global batch."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_reduce  # loads torch.distributed.nn only when distributed

    with warnings.catch_warnings():  # deprecated for the private _functional_collectives, which has no autograd here
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t.to(_collective_device())).to(t.device)


def loss_reduce():
    """What the losses' ``reduce=`` takes here: :func:`sum_autograd` under torchrun, None alone."""
    return sum_autograd if is_distributed() else None


def mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks in place (no gradient); returns ``t`` (unchanged alone)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_collective_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    with torch.no_grad():
        t.copy_((buf / world_size()).to(t.device, t.dtype))
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; ``obj`` itself alone)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(idx: np.ndarray) -> np.ndarray:
    """The rank-strided share ``idx[rank::world_size]`` of a global index list for this rank (all of it alone)."""
    return idx[rank() :: world_size()] if is_distributed() else idx


def check_batch_size(batch_size: int) -> None:
    """A global batch must give every rank at least 2 spots (a per-gene correlation needs 2)."""
    if batch_size < 2 * world_size():
        raise ValueError(
            f"batch_size={batch_size} is split between {world_size()} processes; use at least 2 spots per "
            f"process (batch_size >= {2 * world_size()}) or fewer processes."
        )


def wrap_ddp(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``net`` wrapped in ``DistributedDataParallel`` (gradients averaged over ranks); ``net`` itself alone."""
    if not is_distributed():
        return net
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)
