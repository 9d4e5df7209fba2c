"""Batches of image patches: one DataLoader path for embedding, fine-tune training and predict."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "N_SYMMETRIES",
    "augment_codes",
    "augment_batch",
    "index_batches_of",
    "patch_batches",
    "batch_stream",
    "PatchInputs",
]

#: Symmetries of the square used as augmentations (4 rotations x optional flip).
N_SYMMETRIES = 8
#: Separates the augmentation stream from every other use of the seed.
_AUGMENT_STREAM = 0xA06


def augment_codes(seed: int, epoch: int, n: int) -> np.ndarray:
    """Symmetry codes (0-7) of the ``n`` training patches of ``epoch``: a function of ``(seed, epoch)`` only."""
    rng = np.random.default_rng([int(seed) % 2**63, int(epoch), _AUGMENT_STREAM])
    return rng.integers(0, N_SYMMETRIES, size=int(n)).astype(np.int8)


def augment_batch(x: torch.Tensor, codes: np.ndarray | Sequence[int] | None) -> torch.Tensor:
    """Apply symmetry ``codes[j]`` (``c % 4`` quarter turns, then a flip when ``c >= 4``) to square patch ``j``."""
    if codes is None:
        return x
    codes = np.asarray(codes, dtype=np.int64)
    if codes.shape != (x.shape[0],):
        raise ValueError(f"{codes.shape[0] if codes.ndim else codes} augmentation codes for a batch of {x.shape[0]}.")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"Quarter-turn augmentation needs square patches, got {tuple(x.shape[-2:])}.")
    if not np.any(codes):
        return x
    out = x.clone()
    for c in np.unique(codes[codes > 0]):
        sel = torch.as_tensor(np.flatnonzero(codes == c))
        y = torch.rot90(x[sel], int(c) % 4, dims=(-2, -1))
        out[sel] = torch.flip(y, dims=(-1,)) if c >= 4 else y
    return out


def index_batches_of(indices: Iterable[int], batch_size: int) -> list[np.ndarray]:
    """Cut ``indices`` (an index array, or a sampler such as ``DistributedSampler``) into batches."""
    idx = np.asarray(indices if isinstance(indices, np.ndarray) else [int(i) for i in indices], dtype=np.int64)
    return [idx[s : s + int(batch_size)] for s in range(0, len(idx), int(batch_size))]


class _Batches(Dataset):
    """Item ``j``: the stacked patches ``dataset[i] for i in batches[j]``, with augmentation ``codes[j]``."""

    def __init__(self, dataset, batches: Sequence[np.ndarray], codes: Sequence[np.ndarray] | None = None):
        self.dataset, self.batches, self.codes = dataset, list(batches), None if codes is None else list(codes)
        if self.codes is not None and [len(c) for c in self.codes] != [len(b) for b in self.batches]:
            raise ValueError("augmentation codes must have one entry per patch of every batch")

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> torch.Tensor:
        x = torch.stack([torch.as_tensor(self.dataset[int(i)]) for i in self.batches[j]])
        return augment_batch(x, None if self.codes is None else self.codes[j])


def patch_batches(
    dataset,
    batches: Sequence[np.ndarray],
    *,
    codes: Sequence[np.ndarray] | None = None,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    seed: int = 0,
) -> Iterator[torch.Tensor]:
    """Iterate over ``torch.stack([dataset[i] for i in b])`` for each ``b`` in ``batches`` (augmented), in order."""
    num_workers = int(num_workers)
    yield from DataLoader(
        _Batches(dataset, batches, codes),
        batch_size=None,  # items are whole batches
        num_workers=num_workers,
        pin_memory=bool(pin_memory),
        prefetch_factor=int(prefetch_factor) if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(int(seed)),
    )


def batch_stream(inputs, batches: Sequence[np.ndarray], codes: np.ndarray | None = None) -> Iterator[torch.Tensor]:
    """The input batches ``inputs(b)`` for ``b`` in ``batches``, through ``inputs.stream`` (needed by ``codes``)."""
    stream = getattr(inputs, "stream", None)
    if codes is not None:
        if stream is None:
            raise ValueError(
                "augment=True applies to image patches (fine-tune mode); these inputs are features. Use augment=False."
            )
        ends = np.cumsum([len(b) for b in batches])[:-1]
        return stream(batches, np.split(np.asarray(codes), ends))
    if stream is not None:
        return stream(batches)
    return (inputs(b) for b in batches)


class PatchInputs:
    """Fine-tune mode inputs: uint8 patches of ``dataset`` by row, those of ``positions`` cached when small."""

    def __init__(
        self,
        dataset,
        positions: np.ndarray,
        device,
        cache_bytes: float = 2e9,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        seed: int = 0,
        patch_px: int | None = None,
    ):
        self.dataset, self.device = dataset, torch.device(device)
        self.num_workers, self.prefetch_factor, self.seed = int(num_workers), int(prefetch_factor), int(seed)
        self.pin_memory = self.device.type == "cuda"
        px = int(patch_px if patch_px is not None else dataset.patch_px)
        positions = np.unique(np.asarray(positions, dtype=np.int64))
        self._cache: tuple[np.ndarray, torch.Tensor] | None = None  # (cache row of every dataset row or -1, patches)
        if len(positions) * 3 * px**2 <= cache_bytes:
            row = np.full(len(dataset), -1, dtype=np.int64)
            row[positions] = np.arange(len(positions))
            cache = torch.empty((len(positions), 3, px, px), dtype=torch.uint8)
            s = 0
            for x in self._read(index_batches_of(positions, 64), None):
                cache[s : s + len(x)] = x
                s += len(x)
            self._cache = (row, cache)

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, batches, codes) -> Iterator[torch.Tensor]:
        return patch_batches(
            self.dataset, batches, codes=codes, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
            pin_memory=self.pin_memory, seed=self.seed,
        )  # fmt: skip

    def _cached(self, idx, cache: tuple[np.ndarray, torch.Tensor]) -> torch.Tensor:
        rows = cache[0][np.asarray(idx, dtype=np.int64)]
        if np.any(rows < 0):
            raise IndexError("rows outside the cached positions were asked for")
        return cache[1][torch.as_tensor(rows)]

    def __call__(self, idx) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        if self._cache is not None:
            return self._cached(idx, self._cache).to(self.device)
        return torch.stack([torch.as_tensor(self.dataset[int(i)]) for i in idx]).to(self.device)

    def stream(
        self, batches: Sequence[np.ndarray], codes: Sequence[np.ndarray] | None = None
    ) -> Iterator[torch.Tensor]:
        """The batches ``batches`` (augmented with ``codes``) on the device, in order, read ahead by the workers."""
        if self._cache is not None:
            for j, b in enumerate(batches):
                yield augment_batch(self._cached(b, self._cache), None if codes is None else codes[j]).to(self.device)
            return
        for x in self._read(batches, codes):
            yield x.to(self.device, non_blocking=self.pin_memory)
