"""The patch DataLoader path: augmentation symmetries, determinism with 0 or 2 workers, cache vs no cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from agl_scverse.model import FinetuneNet, train_network
from agl_scverse.train._data import (
    N_SYMMETRIES,
    PatchInputs,
    augment_batch,
    augment_codes,
    batch_stream,
    index_batches_of,
    patch_batches,
)
from agl_scverse.train._trainer import TensorInputs

PX = 8


class RandomPatches(Dataset):
    """Fixed random uint8 patches; ``noisy=True`` adds noise from the global NumPy RNG (a stand-in for
    third-party randomness in a worker)."""

    def __init__(self, n: int = 40, noisy: bool = False, seed: int = 0):
        self.x = np.random.default_rng(seed).integers(0, 256, size=(n, 3, PX, PX), dtype=np.uint8)
        self.noisy = noisy
        self.patch_px = PX

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.x[i]
        if self.noisy:
            x = (x.astype(np.int64) + np.random.randint(0, 3, size=x.shape)) % 256  # noqa: NPY002
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))


def test_the_eight_codes_are_the_eight_symmetries_of_the_square():
    x = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3).repeat(N_SYMMETRIES, 1, 1, 1)
    out = augment_batch(x, np.arange(N_SYMMETRIES))
    assert torch.equal(out[0], x[0])  # code 0: identity
    assert torch.equal(out[1, 0], torch.rot90(x[0, 0], 1))  # a quarter turn
    assert torch.equal(out[4, 0], torch.flip(x[0, 0], dims=(-1,)))  # a horizontal flip
    assert torch.equal(out[6, 0], torch.flip(x[0, 0], dims=(-2,)))  # half turn + flip = vertical flip
    assert len({tuple(o.flatten().tolist()) for o in out}) == N_SYMMETRIES  # all distinct
    assert sorted(out[5].flatten().tolist()) == list(range(9))  # pixels are only moved
    assert augment_batch(x, None) is x
    with pytest.raises(ValueError, match="square"):
        augment_batch(torch.zeros(1, 3, 4, 6), [1])


def test_augment_codes_depend_on_seed_and_epoch_only():
    a = augment_codes(0, 3, 500)
    assert np.array_equal(a, augment_codes(0, 3, 500)) and a.min() >= 0 and a.max() < N_SYMMETRIES
    assert not np.array_equal(a, augment_codes(0, 4, 500)) and not np.array_equal(a, augment_codes(1, 3, 500))
    assert len(np.unique(a)) == N_SYMMETRIES  # every symmetry is used


def test_patch_batches_are_the_same_with_0_or_2_workers():
    ds = RandomPatches()
    batches = index_batches_of(np.random.default_rng(1).permutation(len(ds)), 7)
    codes = np.split(augment_codes(0, 1, len(ds)), np.cumsum([len(b) for b in batches])[:-1])
    serial = list(patch_batches(ds, batches, codes=codes))
    parallel = list(patch_batches(ds, batches, codes=codes, num_workers=2, prefetch_factor=1))
    assert [len(b) for b in serial] == [7] * 5 + [5]
    for s, p, b, c in zip(serial, parallel, batches, codes, strict=True):
        assert torch.equal(s, p)
        assert torch.equal(s, augment_batch(torch.stack([ds[int(i)] for i in b]), c))


def test_workers_are_seeded():
    """Randomness inside a worker (global NumPy RNG) repeats for the same seed and differs for another."""
    ds = RandomPatches(n=12, noisy=True)
    batches = index_batches_of(np.arange(len(ds)), 3)

    def run(seed):
        return torch.cat(list(patch_batches(ds, batches, num_workers=2, prefetch_factor=1, seed=seed)))

    a = run(5)
    assert torch.equal(a, run(5))
    assert not torch.equal(a, run(6))


def test_cached_and_streamed_inputs_give_the_same_batches():
    ds = RandomPatches()
    pos = np.arange(30)
    cached = PatchInputs(ds, pos, "cpu")
    streamed = PatchInputs(ds, pos, "cpu", cache_bytes=0, num_workers=2, prefetch_factor=1)
    assert cached._cache is not None and streamed._cache is None
    idx = np.array([29, 3, 3, 10])
    assert torch.equal(cached(idx), streamed(idx))
    batches = index_batches_of(pos[::-1].copy(), 8)
    codes = [augment_codes(2, 0, len(b)) for b in batches]
    for a, b in zip(cached.stream(batches, codes), streamed.stream(batches, codes), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(IndexError, match="cached"):
        cached(np.array([35]))


def test_feature_inputs_refuse_augmentation():
    with pytest.raises(ValueError, match="augment=True applies to image patches"):
        list(batch_stream(TensorInputs(np.ones((4, 2))), [np.arange(4)], np.zeros(4, dtype=np.int8)))


def _tiny_net(seed: int = 0) -> FinetuneNet:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return FinetuneNet(backbone, 4, 6)


def _train(inputs, augment: bool, seed: int = 0):
    ds = inputs.dataset
    mean = torch.stack([ds[i].float().mean(dim=(1, 2)) for i in range(len(ds))]).numpy()
    Y = np.concatenate([mean, mean[:, :1] * mean[:, 1:2], mean.sum(1, keepdims=True), mean[:, 2:] ** 2], 1)
    net = _tiny_net()
    res = train_network(
        net, inputs, Y, np.arange(30), np.arange(30, 40), 3,
        training={"epochs": 2, "patience": 5, "lr": 1e-2, "batch_size": 8, "augment": augment}, seed=seed,
        progress=False,
    )  # fmt: skip
    return res, net


@pytest.mark.slow  # ~9 s on 2 shared cores: DataLoader workers start for every epoch and validation pass
def test_fine_tune_training_is_identical_with_0_or_2_workers_and_augmentation_is_seeded():
    ds = RandomPatches()
    pos = np.arange(40)
    res0, net0 = _train(PatchInputs(ds, pos, "cpu", cache_bytes=0), augment=True)
    res2, net2 = _train(PatchInputs(ds, pos, "cpu", cache_bytes=0, num_workers=2, prefetch_factor=1), augment=True)
    resc, _ = _train(PatchInputs(ds, pos, "cpu"), augment=True)  # cached: same batches
    assert res0.history["train_loss"] == res2.history["train_loss"] == resc.history["train_loss"]
    for (k, a), b in zip(net0.state_dict().items(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    plain, _ = _train(PatchInputs(ds, pos, "cpu"), augment=False)
    assert plain.history["train_loss"] != res0.history["train_loss"]  # augmentation changes the batches
    assert all(p.is_contiguous() for p in net0.parameters())  # layout restored for saving
