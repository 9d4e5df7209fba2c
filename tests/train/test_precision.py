"""precision=: the resolver's rules, bf16 really used when asked, features close to fp32, fp32 unchanged."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import agl_scverse as agl
from agl_scverse.model import normalize
from agl_scverse.pp import SpotPatches
from agl_scverse.train import _precision as P
from agl_scverse.train._precision import resolve_precision

PX = 32


def _slide(n: int = 12) -> ad.AnnData:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:140, 0:150]
    img = np.stack([(xx * 3) % 256, (yy * 5) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    return ad.AnnData(
        np.ones((n, 2), dtype=np.float32),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
        obsm={"spatial": rng.uniform(25, 110, size=(n, 2))},
        uns={"spatial": {"lib": {"images": {"fullres": img}, "scalefactors": {"microns_per_pixel": 1.0}}}},
    )


def _tiny_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()  # fmt: skip


def test_resolver_rules(monkeypatch):
    fp32 = resolve_precision("fp32", "cpu")
    assert (fp32.name, fp32.channels_last, fp32.scaler) == ("fp32", False, None)
    auto = resolve_precision("auto", "cpu", _tiny_encoder())
    assert auto.name == ("bf16" if P.native_bf16("cpu") else "fp32") and auto.channels_last
    assert not resolve_precision("auto", "cpu", nn.Linear(3, 2)).channels_last  # no convolution: layout unchanged
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    assert resolve_precision("auto", "cpu").name == "bf16"
    monkeypatch.setattr(P, "native_bf16", lambda device: False)
    assert resolve_precision("auto", "cpu").name == "fp32"
    assert resolve_precision("bf16", "cpu").name == "bf16"  # emulated: allowed, with a warning
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="Unknown precision"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        agl.pp.embed_patches(_slide(), encoder=_tiny_encoder(), patch_px=PX, patch_um=PX, precision="fp16")


def test_fp32_is_the_plain_reference_and_bf16_is_used_and_close():
    adata = _slide()
    enc = _tiny_encoder()
    seen: list[torch.dtype] = []
    hook = enc[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    kw = {"encoder": enc, "patch_px": PX, "patch_um": float(PX), "batch_size": 5, "copy": True}
    ref = agl.pp.embed_patches(adata, precision="fp32", **kw)
    assert set(seen) == {torch.float32}
    seen.clear()
    low = agl.pp.embed_patches(adata, precision="bf16", **kw)
    hook.remove()
    assert set(seen) == {torch.bfloat16}  # autocast really ran the convolutions in bf16
    key = "X_agl_sequential"
    X, Xb = ref.obsm[key], low.obsm[key]
    assert X.dtype == Xb.dtype == np.float32  # stored as float32 whatever the precision
    cos = (X * Xb).sum(1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(Xb, axis=1))
    assert cos.min() > 0.999 and not np.array_equal(X, Xb)  # the stated tolerance (bf16 keeps 8 mantissa bits)
    assert ref.uns["agl_embeddings"][key]["precision"] == "fp32"
    rec = low.uns["agl_embeddings"][key]
    assert (rec["precision"], rec["channels_last"], rec["precision_requested"]) == ("bf16", True, "bf16")
    assert all(p.is_contiguous() for p in enc.parameters())  # the caller's module gets its layout back
    # fp32: exactly encoder(normalize(patches)), batch by batch, as before precision= existed
    ds = SpotPatches(adata, patch_px=PX, patch_um=float(PX))
    with torch.inference_mode():
        manual = np.concatenate([enc(normalize(torch.stack([ds[i] for i in range(s, min(s + 5, len(ds)))]))).numpy()
                                 for s in range(0, len(ds), 5)])  # fmt: skip
    np.testing.assert_array_equal(X, manual)
