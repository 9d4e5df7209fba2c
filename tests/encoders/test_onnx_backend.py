"""The ONNX Runtime backend of frozen encoders: export of every supported kind, the cache, the choice, the checks."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import timm
import torch
from builders import NOISE_PX, NOISE_UM, needs_ort
from torch import nn

import agl_scverse as agl
from agl_scverse.encoders import _onnx_backend as ob
from agl_scverse.encoders._factory import get_encoder
from agl_scverse.encoders._modules import ClsMeanPool
from agl_scverse.encoders._presets import PRESETS, kwargs_from_json
from agl_scverse.pp import embed_patches

PX, UM = NOISE_PX, NOISE_UM


def _tiny_preset(name: str) -> tuple[nn.Module, int]:
    """A preset's architecture (its LayerScale, registers, SwiGLU, pooling) at 1 block, width 48, ~4 patches a side."""
    p = PRESETS[name]
    kw = kwargs_from_json(p.timm_kwargs)
    patch = int(kw.get("patch_size", 16 if "patch16" in p.arch else 14))
    px = 4 * patch
    kw.update(depth=1, embed_dim=48, num_heads=2, img_size=px)
    if p.timm_kwargs.get("mlp_layer") == "SwiGLUPacked":
        kw["mlp_ratio"] = 2.0  # an even hidden width at this small size
    torch.manual_seed(0)
    m = timm.create_model(p.arch, pretrained=False, num_classes=0, **kw)
    return (ClsMeanPool(m) if p.pooling == "cls+mean" else m).eval(), px


def _timm(name: str, px: int, **kw) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, **kw).eval(), px


KINDS = {
    "resnet18": lambda: _timm("resnet18", 32),
    "densenet121": lambda: _timm("densenet121", 32),
    "tf_efficientnet_lite0": lambda: _timm("tf_efficientnet_lite0", 32),
    "vit LayerScale + 4 registers": lambda: _timm(
        "vit_tiny_patch16_224", 32, depth=2, img_size=32, init_values=1e-5, reg_tokens=4
    ),
    "vit dynamic_img_size": lambda: _timm("vit_tiny_patch16_224", 32, depth=1, img_size=32, dynamic_img_size=True),
    **{f"preset {n}": (lambda n=n: _tiny_preset(n)) for n in PRESETS},
}


@needs_ort
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_supported_kind_exports_and_agrees_with_torch(kind, graph_cache):
    module, px = KINDS[kind]()
    g = torch.Generator().manual_seed(0)
    first = torch.randn(3, 3, px, px, generator=g)
    enc = ob.onnx_encoder(module, px, first)
    assert enc.check_cosine >= ob.MIN_COSINE
    x = torch.randn(5, 3, px, px, generator=g)  # another batch size than the export's: the batch axis is dynamic
    with torch.inference_mode():
        ref = module(x)
    got = enc(x)
    assert got.shape == ref.shape
    assert ob.row_cosine(got, ref).min() >= 0.999
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-3, atol=1e-4)


@needs_ort
def test_graph_cache_reuses_keys_by_content_and_is_private(graph_cache, monkeypatch):
    calls = []
    real = ob._export
    monkeypatch.setattr(ob, "_export", lambda *a: (calls.append(1), real(*a))[1])
    module, px = _timm("resnet18", 32)
    x = torch.randn(2, 3, px, px)
    ob.onnx_encoder(module, px, x)
    ob.onnx_encoder(module, px, x)
    assert len(calls) == 1  # the second run reads the cached graph
    ob.onnx_encoder(module, 48, torch.randn(2, 3, 48, 48))
    assert len(calls) == 2  # another input size: another graph
    with torch.no_grad():
        module.conv1.weight.mul_(0.5)
    ob.onnx_encoder(module, px, x)
    assert len(calls) == 3  # changed weights: another key
    entries = [p for p in graph_cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 3 and not [p for p in graph_cache.iterdir() if p.name.startswith(".")]  # no temp left over
    for d in (graph_cache, graph_cache.parent):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert set(meta["files"]) == {"encoder.onnx"} and len(meta["key"]) == 64


@needs_ort
def test_broken_or_stale_graphs_are_exported_again(graph_cache, monkeypatch):
    calls = []
    real = ob._export
    monkeypatch.setattr(ob, "_export", lambda *a: (calls.append(1), real(*a))[1])
    a, px = _timm("resnet18", 32)
    x = torch.randn(2, 3, px, px)
    ob.onnx_encoder(a, px, x)
    (entry,) = list(graph_cache.iterdir())
    with open(entry / "encoder.onnx", "r+b") as fh:  # a truncated / altered file fails its sha256
        fh.truncate(1000)
    enc = ob.onnx_encoder(a, px, x)
    assert len(calls) == 2 and enc.check_cosine >= ob.MIN_COSINE
    # a stale graph: intact files under the key of another module (e.g. a registered factory whose code changed)
    torch.manual_seed(1)
    b = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    key_b = ob.graph_key(b, px)
    stale = graph_cache / key_b[:32]
    stale.mkdir(mode=0o700)
    (stale / "encoder.onnx").write_bytes((entry / "encoder.onnx").read_bytes())
    meta = {"key": key_b, "files": ob._files_sha256(stale)}
    (stale / "meta.json").write_text(json.dumps(meta))
    enc = ob.onnx_encoder(b, px, x)
    assert len(calls) == 3  # the check against torch caught it, and the graph was made again
    with torch.inference_mode():
        assert ob.row_cosine(enc(x), b(x)).min() >= 0.999


@needs_ort
def test_a_symlinked_cache_is_refused_and_the_run_goes_on(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "c").mkdir()
    os.symlink(target, tmp_path / "c" / "onnx")
    monkeypatch.setenv("AGL_SCVERSE_CACHE", str(tmp_path / "c"))
    module, px = _timm("resnet18", 32)
    x = torch.randn(2, 3, px, px)
    enc = ob.onnx_encoder(module, px, x)  # exported for this run only
    assert enc.check_cosine >= ob.MIN_COSINE
    assert list(target.iterdir()) == []  # nothing written through the link


@needs_ort
def test_threads_follow_torch(graph_cache):
    module, px = _timm("resnet18", 32)
    torch.set_num_threads(1)
    assert ob.onnx_encoder(module, px, torch.randn(2, 3, px, px)).threads == 1


# ------------------------------------------------------------------------------------------------ embed_patches
@needs_ort
def test_embed_patches_auto_uses_onnx_runtime_and_records_it(noise, graph_cache):
    embed_patches(noise, encoder="resnet18", patch_px=PX, patch_um=UM, backend="torch", key_added="t")
    embed_patches(noise, encoder="resnet18", patch_px=PX, patch_um=UM, key_added="o")  # backend="auto"
    rt, ro = noise.uns["agl_embeddings"]["t"], noise.uns["agl_embeddings"]["o"]
    assert (rt["backend"], rt["backend_requested"]) == ("torch", "torch")
    assert (ro["backend"], ro["backend_requested"]) == ("onnx", "auto")
    assert ro["onnx_check_cosine"] >= 0.999 and ro["onnx_providers"] == ["CPUExecutionProvider"]
    assert ro["precision"] == "fp32" and ro["channels_last"] is False
    assert ob.row_cosine(noise.obsm["t"], noise.obsm["o"]).min() >= 0.999
    embed_patches(noise, encoder="resnet18", patch_px=PX, patch_um=UM, key_added="o2", backend="onnx")
    np.testing.assert_array_equal(noise.obsm["o"], noise.obsm["o2"])  # same seed, same features
    noise.write_h5ad(graph_cache.parent / "s.h5ad")  # the record is h5ad-serialisable


@needs_ort
def test_int8_graphs_are_cached_apart_and_recorded(graph_cache):
    """int8 dynamic quantisation (measured by the benchmark; not a backend option, see the Encoders page)."""
    module, px = _timm("resnet18", 32)
    x = torch.randn(4, 3, px, px)
    fp32 = ob.onnx_encoder(module, px, x)
    q = ob.onnx_encoder(module, px, x, quantization="int8-dynamic")
    assert q.record()["onnx_quantization"] == "int8-dynamic" and "onnx_quantization" not in fp32.record()
    assert len(list(graph_cache.iterdir())) == 2
    assert 0.9 < ob.row_cosine(q(x), fp32(x)).min() < 1.0  # close, not equal


def test_auto_falls_back_to_torch_without_onnxruntime(noise, graph_cache, monkeypatch):
    monkeypatch.setattr(ob, "onnx_backend_available", lambda: False)
    said = []
    monkeypatch.setattr(ob.logg, "info", lambda msg, *a, **k: said.append(msg))
    embed_patches(noise, encoder="resnet18", patch_px=PX, patch_um=UM, key_added="t")
    assert noise.uns["agl_embeddings"]["t"]["backend"] == "torch"
    assert sum("the encoder runs in torch: onnxruntime / onnx are not installed" in m for m in said) == 1
    with pytest.raises(ImportError, match=r"agl-scverse\[onnx\]"):
        embed_patches(noise, encoder="resnet18", patch_px=PX, patch_um=UM, key_added="o", backend="onnx")
    assert "o" not in noise.obsm


def test_auto_keeps_torch_for_callables_and_other_precisions(noise, graph_cache):
    embed_patches(noise, encoder=lambda x: x.mean(dim=(2, 3)), patch_px=PX, patch_um=UM, key_added="c")
    assert noise.uns["agl_embeddings"]["c"]["backend"] == "torch"
    assert ob.select_backend("auto", torch.device("cpu"), "bf16") == "torch"
    assert ob.select_backend("auto", torch.device("cuda"), "fp32") == "torch"
    assert ob.select_backend("auto", torch.device("cpu"), "fp32", precision_requested="fp32") == "torch"  # reference
    embed_patches(noise, encoder="resnet18", patch_px=PX, patch_um=UM, key_added="r", precision="fp32")
    assert noise.uns["agl_embeddings"]["r"]["backend"] == "torch"
    with pytest.raises(ValueError, match="Unknown backend"):
        embed_patches(noise, encoder="resnet18", patch_px=PX, patch_um=UM, backend="tensorrt")


@needs_ort
def test_forced_onnx_refuses_what_it_cannot_run(noise, graph_cache):
    with pytest.raises(ValueError, match="float32"):
        ob.select_backend("onnx", torch.device("cpu"), "bf16")

    class Untraceable(nn.Module):
        def forward(self, x):
            return torch.from_numpy(x.numpy().mean(axis=(2, 3)))  # leaves torch: no graph to trace

    before = set(noise.obsm)
    with pytest.raises(RuntimeError, match="backend='onnx'.*backend='torch'"):
        embed_patches(noise, encoder=Untraceable(), patch_px=PX, patch_um=UM, backend="onnx")
    assert set(noise.obsm) == before
    embed_patches(noise, encoder=Untraceable(), patch_px=PX, patch_um=UM, key_added="u")  # auto: torch, logged
    assert noise.uns["agl_embeddings"]["u"]["backend"] == "torch"


# ------------------------------------------------------------------------------------------------ predictions
@needs_ort
def test_models_predict_alike_from_either_backends_features(graph_cache):
    """A model trained on torch features predicts from ONNX Runtime features (and the other way round)."""
    from builders import FAST

    kw = {"n_tissue_genes": 10, "n_informative": 10, "n_noise": 20, "n_bursty_noise": 2}
    preds = {}
    for train_backend in ("torch", "onnx"):
        train = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=0, **kw)
        model = agl.tl.agl_fit(
            train, method="agl", encoder="resnet18", patch_px=32, n_targets=3, min_cells=1, backend=train_backend,
            **{**FAST, "epochs": 2},
        )  # fmt: skip
        assert train.uns["agl_embeddings"]["X_agl_resnet18"]["backend"] == train_backend
        for pred_backend in ("torch", "onnx"):
            new = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=1, **kw)
            out = agl.tl.predict_anndata(new, model, backend=pred_backend)
            assert out.uns["agl_embeddings"]["X_agl_resnet18"]["backend"] == pred_backend
            preds[train_backend, pred_backend] = np.asarray(out.X)
    for train_backend in ("torch", "onnx"):
        same = preds[train_backend, train_backend]
        other = preds[train_backend, "onnx" if train_backend == "torch" else "torch"]
        scale = np.abs(same).max()
        assert np.abs(other - same).max() <= 1e-3 * scale


def test_finetuned_models_refuse_the_onnx_backend():
    from agl_scverse.model import AGLModel

    model = AGLModel.__new__(AGLModel)
    model.config = {"mode": "finetune"}
    with pytest.raises(ValueError, match="runs in torch"):
        AGLModel.predict(model, np.zeros((1, 8, 8, 3), dtype=np.uint8), backend="onnx")


def test_get_encoder_module_is_untouched_by_an_export(graph_cache):
    if not ob.onnx_backend_available():
        pytest.skip("onnxruntime / onnx not installed")
    module, info = get_encoder("resnet18")
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    ob.onnx_encoder(module, 32, torch.randn(2, 3, 32, 32))
    assert module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@needs_ort
def test_losing_the_race_for_a_cache_entry_uses_its_own_graph_and_cleans_up(graph_cache, monkeypatch):
    """Another process moved its (equal) graph into place first: this one runs from its temporary copy."""
    real = os.replace

    def replace(src, dst):
        if not str(os.path.basename(dst)).startswith("."):
            raise OSError(39, "Directory not empty")  # as os.replace onto another process's entry
        return real(src, dst)

    monkeypatch.setattr(ob.os, "replace", replace)
    module, px = _timm("resnet18", 32)
    enc = ob.onnx_encoder(module, px, torch.randn(2, 3, px, px))
    assert enc.check_cosine >= ob.MIN_COSINE
    assert list(graph_cache.iterdir()) == []  # the temporary copy is gone, nothing half-written is left
