"""embed_patches' default path: patches cut in a thread while the encoder runs, and what it keeps between calls."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import timm
import torch
from builders import NOISE_PX, NOISE_UM, needs_ort

from agl_scverse.configs import EncoderConfig
from agl_scverse.encoders import _onnx_backend as ob
from agl_scverse.model import get_encoder
from agl_scverse.pp import SpotPatches, embed_patches
from agl_scverse.pp import _embed as emb
from agl_scverse.pp._embed import ReadAhead, built_encoder

PX, UM = NOISE_PX, NOISE_UM


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("agl-read-ahead")]


def _encode(module, ds, info, read_ahead: bool, backend: str = "torch", **kw):
    return emb._encode(
        module, ds, info["mean"], info["std"], 3, torch.device("cpu"), 0, "test", progress=False,
        backend=backend, info=info, read_ahead=read_ahead, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ ReadAhead
def test_read_ahead_keeps_order_and_at_most_depth_plus_two_items_alive():
    made, used = [], []

    def source():
        for i in range(12):
            made.append(i)
            yield i

    with ReadAhead(source(), depth=1) as it:
        for i in it:
            time.sleep(0.01)  # the thread runs ahead as far as it may
            assert len(made) - len(used) <= 3  # depth + 2: one in hand, one queued, one being made
            used.append(i)
    assert used == list(range(12)) and not _threads()


def test_read_ahead_raises_the_sources_error_and_stops():
    def source():
        yield 1
        raise KeyError("the third patch")

    with pytest.raises(KeyError, match="the third patch"), ReadAhead(source()) as it:
        list(it)
    assert not _threads()


def test_leaving_early_stops_the_thread_and_closes_the_source():
    closed = []

    def source():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    with pytest.raises(RuntimeError, match="the encoder failed"), ReadAhead(source()) as it:
        for i in it:
            if i == 2:
                raise RuntimeError("the encoder failed")
    assert closed == [True] and not _threads()


# ------------------------------------------------------------------------------------------------ _encode
class _Failing(torch.utils.data.Dataset):
    """A dataset whose item ``bad`` cannot be read."""

    def __init__(self, ds, bad: int):
        self.ds, self.bad = ds, bad

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        if i == self.bad:
            raise OSError(f"cannot read patch {i}")
        return self.ds[i]


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnx", marks=needs_ort)])
def test_read_ahead_features_equal_the_serial_paths_bit_for_bit(noise, graph_cache, backend):
    module, info = get_encoder("resnet18")
    ds = SpotPatches(noise, patch_px=PX, patch_um=UM)
    serial, rec_s = _encode(module, ds, info, read_ahead=False, backend=backend)
    ahead, rec_a = _encode(module, ds, info, read_ahead=True, backend=backend)
    np.testing.assert_array_equal(ahead, serial)
    assert rec_a["backend"] == rec_s["backend"] == backend
    order = [7, 2, 9, 0, 4]  # a sampler's order is kept (batches of other patches: equal up to float rounding)
    part, _ = _encode(module, ds, info, read_ahead=True, backend=backend, sampler=order)
    np.testing.assert_array_equal(part, _encode(module, ds, info, read_ahead=False, backend=backend, sampler=order)[0])
    np.testing.assert_allclose(part, serial[order], rtol=1e-4, atol=1e-5)
    assert not _threads()


def test_the_read_ahead_switch_cuts_patches_serially_with_the_same_features(noise, graph_cache, monkeypatch):
    alive = []

    def mean_colour(x):  # records whether the read-ahead thread runs beside the encoder
        alive.append(bool(_threads()))
        return x.mean(dim=(2, 3))

    enc = EncoderConfig(mean_colour, patch_px=PX, patch_um=UM, batch_size=3)
    ahead = embed_patches(noise, enc, key_added="e", copy=True).obsm["e"]
    assert alive and all(alive)  # the default: read ahead
    alive.clear()
    monkeypatch.setattr(emb, "READ_AHEAD", False)
    serial = embed_patches(noise, enc, key_added="e", copy=True).obsm["e"]
    assert alive and not any(alive)
    np.testing.assert_array_equal(serial, ahead)


def test_errors_while_reading_or_encoding_are_raised_as_before_and_leave_no_thread(noise, graph_cache):
    module, info = get_encoder("resnet18")
    bad = _Failing(SpotPatches(noise, patch_px=PX, patch_um=UM), bad=7)
    messages = []
    for read_ahead in (False, True):
        with pytest.raises(OSError, match="cannot read patch 7") as err:
            _encode(module, bad, info, read_ahead=read_ahead)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and not _threads()

    seen = []

    def broken(x):  # fails on its second batch, while the thread cuts the third
        seen.append(len(x))
        if len(seen) == 2:
            raise RuntimeError("out of memory in the encoder")
        return x.mean(dim=(2, 3))

    before = dict(noise.obsm)
    with pytest.raises(RuntimeError, match="out of memory in the encoder"):
        embed_patches(noise, encoder=broken, patch_px=PX, patch_um=UM, batch_size=3)
    assert dict(noise.obsm).keys() == before.keys() and not _threads()


# ------------------------------------------------------------------------------------------------ kept between calls
def test_the_built_encoder_is_kept_by_content_and_rebuilt_when_it_changes(tmp_path, graph_cache):
    torch.manual_seed(0)
    src = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    a, info_a = built_encoder("resnet18", path, False, 0, None, True)
    b, info_b = built_encoder("resnet18", path, False, 0, None, True)
    assert b is a and info_b == info_a and info_b is not info_a  # the record is the caller's own copy
    info_b["feature_dim"] = -1
    assert built_encoder("resnet18", path, False, 0, None, True)[1]["feature_dim"] != -1
    assert built_encoder("resnet18", path, False, 1, None, True)[0] is not a  # another seed, another build
    with torch.no_grad():
        src.conv1.weight.mul_(0.5)
    torch.save(src.state_dict(), path)  # same path, other content
    c, info_c = built_encoder("resnet18", path, False, 0, None, True)
    assert c is not a and info_c["weights_sha256"] != info_a["weights_sha256"]
    assert torch.equal(c.conv1.weight, src.conv1.weight)


def test_registered_and_large_encoders_are_not_kept(graph_cache, monkeypatch):
    from agl_scverse.model import register_encoder

    register_encoder("h23_tiny", lambda: torch.nn.Conv2d(3, 4, 1), overwrite=True)
    assert (
        built_encoder("h23_tiny", None, False, 0, None, True)[0]
        is not built_encoder("h23_tiny", None, False, 0, None, True)[0]
    )
    monkeypatch.setattr(emb, "MAX_KEPT_ENCODER_BYTES", 1000)
    assert (
        built_encoder("resnet18", None, False, 0, None, True)[0]
        is not built_encoder("resnet18", None, False, 0, None, True)[0]
    )


@needs_ort
def test_the_onnx_session_is_kept_by_content_between_runs(noise, graph_cache, monkeypatch):
    calls = []
    real = ob.onnx_encoder
    monkeypatch.setattr(ob, "onnx_encoder", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    kw = {"encoder": "resnet18", "patch_px": PX, "patch_um": UM, "copy": True, "key_added": "e"}
    one = embed_patches(noise, **kw)
    two = embed_patches(noise, **kw)
    assert len(calls) == 1  # started and checked once
    np.testing.assert_array_equal(one.obsm["e"], two.obsm["e"])
    r1, r2 = one.uns["agl_embeddings"]["e"], two.uns["agl_embeddings"]["e"]
    assert r1["backend"] == r2["backend"] == "onnx" and r2["onnx_check_cosine"] == r1["onnx_check_cosine"] >= 0.999
    embed_patches(noise, **kw, seed=1)  # other weights: another graph, started and checked
    assert len(calls) == 2
    n = torch.get_num_threads()
    torch.set_num_threads(n + 1)
    try:
        embed_patches(noise, **kw, seed=1)  # other threads: another session
    finally:
        torch.set_num_threads(n)
    assert len(calls) == 3
