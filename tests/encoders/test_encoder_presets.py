"""Encoder presets, hf-hub names, strict weight loading, fast offline failure, and rebuilding at predict.

The architecture numbers below are written from the model cards (huggingface.co/<hub id>), not from the presets:
blocks, width, register tokens, patch size, LayerScale, published parameter count, feature size. Every preset
is built on torch's ``meta`` device: no weights, no memory.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import timm
import torch
from builders import FAST, small_slide
from safetensors.torch import save_file
from torch import nn

import agl_scverse as agl
from agl_scverse.encoders._presets import PRESETS, find_preset
from agl_scverse.model import EncoderPreset, get_encoder, list_presets, load_weights

IMAGENET_MEAN = [0.485, 0.456, 0.406]

# name: (blocks, width, register tokens, patch px, published parameters, feature size, mean) from the model cards
PUBLISHED = {
    "uni": (24, 1024, 0, 16, 303e6, 1024, IMAGENET_MEAN),  # ViT-L/16
    "uni2-h": (24, 1536, 8, 14, 681e6, 1536, IMAGENET_MEAN),
    "virchow2": (32, 1280, 4, 14, 632e6, 2560, IMAGENET_MEAN),  # ViT-H/14, class token + mean patch token
    "h-optimus-0": (40, 1536, 4, 14, 1.1e9, 1536, [0.707223, 0.578729, 0.703617]),  # ViT-g/14
    "prov-gigapath": (40, 1536, 0, 16, 1.13e9, 1536, IMAGENET_MEAN),  # tile encoder
    "phikon-v2": (24, 1024, 0, 16, 307e6, 1024, IMAGENET_MEAN),  # ViT-L/16
}


def test_every_preset_has_published_facts():
    assert set(PUBLISHED) == set(PRESETS)
    rows = {r["name"]: r for r in list_presets()}
    for name, p in PRESETS.items():
        assert rows[name]["mpp"] == 0.5 and rows[name]["patch_px"] == 224 and rows[name]["patch_um"] == 112.0
        assert p.reference.startswith("https://huggingface.co/") and p.hf_hub in p.reference


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_builds_on_meta_with_the_published_architecture(name):
    blocks, width, n_reg, patch, n_params, fdim, mean = PUBLISHED[name]
    with torch.device("meta"):
        module, info = get_encoder(name)
        y = module(torch.empty(2, 3, 224, 224))
    assert y.shape == (2, fdim) and info["feature_dim"] == fdim
    vit = module.vit if name == "virchow2" else module
    sd = vit.state_dict()
    assert all(v.is_meta for v in sd.values())  # nothing allocated
    assert sum(k.startswith("blocks.") and k.endswith(".norm1.weight") for k in sd) == blocks
    assert sd["blocks.0.norm1.weight"].shape == (width,)
    assert sd["patch_embed.proj.weight"].shape == (width, 3, patch, patch)
    assert all(f"blocks.{i}.ls1.gamma" in sd and f"blocks.{i}.ls2.gamma" in sd for i in range(blocks))  # LayerScale
    if n_reg:
        assert sd["reg_token"].shape == (1, n_reg, width)
    else:
        assert "reg_token" not in sd
    count = sum(p.numel() for p in vit.parameters())
    assert abs(count / n_params - 1) < 0.035, f"{name}: {count / 1e6:.1f}M parameters, published {n_params / 1e6}M"
    assert info["mean"] == pytest.approx(mean) and info["native_mpp"] == 0.5 and info["preset"] == name
    assert info["source"] == "preset" and info["arch"] == PRESETS[name].arch


def test_hub_ids_and_aliases_find_the_presets():
    assert find_preset("hf-hub:MahmoodLab/UNI").name == "uni"
    assert find_preset("hf_hub:paige-ai/Virchow2").name == "virchow2"
    assert find_preset("H_optimus_0").name == "h-optimus-0"
    assert find_preset("vit_large_patch16_224") is None
    with torch.device("meta"):
        _, info = get_encoder("hf-hub:MahmoodLab/UNI", encoder_kwargs={"img_size": 448})
    kw = json.loads(info["encoder_kwargs"])
    assert kw["img_size"] == 448 and kw["init_values"] == 1e-5  # the user's over the preset's


# ------------------------------------------------------------------------------------------------ strict loading
def _tiny_vit(layerscale: bool = True, **kw) -> nn.Module:
    extra = {"init_values": 1e-5} if layerscale else {}
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0, **extra, **kw
    ).eval()  # fmt: skip


TINY = {"img_size": 32, "depth": 2, "init_values": 1e-5}


def test_strict_loading_names_the_missing_layerscale_tensors(tmp_path):
    torch.manual_seed(0)
    sd = _tiny_vit().state_dict()
    no_ls = {k: v for k, v in sd.items() if ".ls" not in k}
    torch.save(no_ls, tmp_path / "no_ls.pth")
    with pytest.raises(ValueError, match=r"4 model tensors are not in the file: blocks\.0\.ls1\.gamma") as err:
        get_encoder("vit_tiny_patch16_224", weights=tmp_path / "no_ls.pth", encoder_kwargs=TINY)
    assert "blocks.1.ls2.gamma" in str(err.value)


def test_strict_loading_refuses_layerscale_tensors_the_model_lacks(tmp_path):
    torch.manual_seed(0)
    save_file(_tiny_vit().state_dict(), str(tmp_path / "ls.safetensors"))
    with pytest.raises(ValueError, match=r"not used by the model: blocks\.0\.ls1\.gamma.*init_values") as err:
        get_encoder(
            "vit_tiny_patch16_224", weights=tmp_path / "ls.safetensors", encoder_kwargs={"img_size": 32, "depth": 2}
        )
    assert "Nothing was loaded" in str(err.value)
    # with LayerScale the same file loads exactly, and gives the saved model's features
    torch.manual_seed(0)
    ref = _tiny_vit()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))  # make ls gammas differ from their init
    save_file(ref.state_dict(), str(tmp_path / "ls2.safetensors"))
    model, info = get_encoder("vit_tiny_patch16_224", weights=tmp_path / "ls2.safetensors", encoder_kwargs=TINY)
    assert info["weights_load"]["missing"] == [] and info["weights_load"]["unexpected"] == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_strict_loading_refuses_an_extra_tensor_and_strict_false_opts_out(tmp_path):
    torch.manual_seed(0)
    sd = dict(_tiny_vit().state_dict())
    sd["projector.weight"] = torch.zeros(8, 192)
    torch.save({"state_dict": sd}, tmp_path / "extra.bin")
    with pytest.raises(ValueError, match=r"1 file tensors are not used by the model: projector\.weight"):
        load_weights(_tiny_vit(), tmp_path / "extra.bin")
    summary = load_weights(_tiny_vit(), tmp_path / "extra.bin", strict=False)
    assert summary["unexpected"] == ["projector.weight"] and summary["strict"] is False


def test_shape_mismatch_is_an_error_with_both_shapes(tmp_path):
    torch.manual_seed(0)
    sd = dict(_tiny_vit().state_dict())
    sd["pos_embed"] = torch.zeros(1, 9, 192)  # made for a 3 x 3 patch grid; the model has 2 x 2
    torch.save(sd, tmp_path / "pos.pth")
    with pytest.raises(
        ValueError, match=r"differ in shape \(file vs model\): pos_embed \[1, 9, 192\] vs \[1, 5, 192\]"
    ):
        load_weights(_tiny_vit(), tmp_path / "pos.pth")


def test_a_weights_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    import os

    from agl_scverse.encoders import _weights

    real, hashed = _weights.sha256_file, []
    monkeypatch.setattr(_weights, "sha256_file", lambda p: hashed.append(p) or real(p))
    f = tmp_path / "w.pth"
    f.write_bytes(b"a" * 64)
    first = _weights.weights_sha256(f)
    assert _weights.weights_sha256(str(f)) == first and len(hashed) == 1
    st = os.stat(f)
    f.write_bytes(b"b" * 64)  # the same size and inode, other bytes
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a later write time, even on a coarse clock
    assert _weights.weights_sha256(f) == real(f) != first and len(hashed) == 2


def test_dinov2_file_with_transformers_names_loads_as_timm(tmp_path):
    """A Dinov2Model-layout file (Phikon-v2's format) converts to timm names, q/k/v joined, mask token ignored."""
    torch.manual_seed(1)
    ref = _tiny_vit()
    sd = ref.state_dict()
    hf = {
        "embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": torch.zeros(1, 192),
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
    }  # fmt: skip
    for i in range(2):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[b + "attn.qkv.bias"].chunk(3)
        hf.update({
            e + "attention.attention.query.weight": q, e + "attention.attention.key.weight": k,
            e + "attention.attention.value.weight": v, e + "attention.attention.query.bias": qb,
            e + "attention.attention.key.bias": kb, e + "attention.attention.value.bias": vb,
            e + "attention.output.dense.weight": sd[b + "attn.proj.weight"],
            e + "attention.output.dense.bias": sd[b + "attn.proj.bias"],
            e + "layer_scale1.lambda1": sd[b + "ls1.gamma"], e + "layer_scale2.lambda1": sd[b + "ls2.gamma"],
        })  # fmt: skip
        for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for leaf in ("weight", "bias"):
                hf[f"{e}{part}.{leaf}"] = sd[f"{b}{part}.{leaf}"]
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "dinov2.safetensors"))
    model = _tiny_vit()
    summary = load_weights(model, tmp_path / "dinov2.safetensors", key_format="hf-dinov2", ignore_keys=("mask_token",))
    assert summary["ignored"] == ["mask_token"] and summary["missing"] == [] and summary["unexpected"] == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


# ------------------------------------------------------------------------------------------------ offline
@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    return tmp_path / "hub"


@pytest.fixture
def waits(monkeypatch):
    """What would make an offline call slow, recorded instead of timed (a wall clock fails on a loaded machine):
    every attempt to reach the network (refused at once) and every sleep asked for (still slept)."""
    found: list[tuple[str, object]] = []
    real_sleep = time.sleep

    def refuse(what):
        def call(*args, **kwargs):
            found.append((what, args[1:2] or args[:1]))
            raise OSError(f"{what}: no network in this test")

        return call

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(time, "sleep", lambda s: (found.append(("sleep", s)), real_sleep(s))[1])
    return found


@pytest.mark.parametrize("name", ["uni", "hf-hub:MahmoodLab/UNI", "hf-hub:someone/tiny-vit", "resnet18"])
def test_offline_pretrained_fails_at_once_with_how_to(name, offline_empty_cache, waits):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as err:
        get_encoder(name, pretrained=True)
    assert waits == []  # at once: no network tried, no retry waited for
    msg = str(err.value)
    assert "weights=" in msg
    if name != "resnet18":
        assert "hf auth login" in msg and "hf download" in msg
    if "UNI" in name or name == "uni":
        assert "gated" in msg and "accepted the terms" in msg


def _fake_hub_repo(cache, repo: str, files: dict[str, bytes]) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    commit = "0" * 40
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_hf_hub_name_builds_from_the_local_cache_offline(offline_empty_cache, tmp_path, waits):
    torch.manual_seed(2)
    ref = _tiny_vit()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    config = {
        "architecture": "vit_tiny_patch16_224",
        "model_args": {"img_size": 32, "depth": 2, "init_values": 1e-5, "num_classes": 0},
        "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    _fake_hub_repo(offline_empty_cache, "someone/tiny-vit", {
        "config.json": json.dumps(config).encode(), "model.safetensors": (tmp_path / "w.safetensors").read_bytes(),
    })  # fmt: skip
    model, info = get_encoder("hf-hub:someone/tiny-vit", pretrained=True)
    assert waits == []  # from the cache alone: no network tried, no retry waited for
    assert info["source"] == "hf-hub" and info["hf_hub"] == "someone/tiny-vit" and info["mean"] == [0.5] * 3
    assert info["weights_load"]["missing"] == [] and len(info["weights_sha256"]) == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    # without weights the architecture alone comes from the cached config.json
    _, info2 = get_encoder("hf-hub:someone/tiny-vit")
    assert json.loads(info2["encoder_kwargs"])["init_values"] == 1e-5 and info2["weights_sha256"] == ""


def test_encoder_kwargs_without_json_form_are_refused():
    with pytest.raises(TypeError, match="encoder_kwargs\\['norm_layer'\\]"):
        get_encoder("vit_tiny_patch16_224", encoder_kwargs={"img_size": 32, "norm_layer": nn.BatchNorm1d})


# ------------------------------------------------------------------------------------------------ predict rebuilds
def _image_slide(seed: int = 0, n: int = 40):
    adata = small_slide(n=n, seed=seed)
    del adata.obsm["X_emb"]
    img = np.random.default_rng(seed).integers(0, 256, size=(720, 720, 3), dtype=np.uint8)
    adata.uns["spatial"] = {"lib": {"images": {"fullres": img}, "scalefactors": {"microns_per_pixel": 1.0}}}
    return adata


@pytest.fixture
def tiny_preset(monkeypatch):
    """A stand-in preset: a 2-block LayerScale ViT at 32 px (what a real preset records, at toy size)."""
    p = EncoderPreset(
        name="tiny-ls", arch="vit_tiny_patch16_224", timm_kwargs=TINY, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
        mpp=1.0, patch_px=32, feature_dim=192, hf_hub="someone/tiny-ls", gated=True,
    )  # fmt: skip
    monkeypatch.setitem(PRESETS, "tiny-ls", p)
    return p


def test_predict_rebuilds_a_preset_encoder_from_the_saved_config(tiny_preset, tmp_path):
    torch.manual_seed(3)
    save_file(_tiny_vit().state_dict(), str(tmp_path / "tiny.safetensors"))
    weights = tmp_path / "tiny.safetensors"
    train = _image_slide(0)
    agl.pp.embed_patches(train, encoder="tiny-ls", weights=weights, patch_px=32, patch_um=32.0)
    rec = train.uns["agl_embeddings"]["X_agl_tiny-ls"]
    assert rec["preset"] == "tiny-ls" and rec["native_mpp"] == 1.0 and rec["mean"] == [0.5] * 3
    model = agl.tl.agl_fit(train, method="pgl", embedding_key="X_agl_tiny-ls", n_targets=5, min_cells=1, **FAST)
    model.save(tmp_path / "m")
    loaded = agl.model.AGLModel.load(tmp_path / "m")
    assert loaded.config["encoder"]["spec"] == "tiny-ls"
    new = _image_slide(1)
    with pytest.raises(FileNotFoundError, match="Pass weights="):
        agl.tl.agl_predict(new.copy(), loaded)
    agl.tl.agl_predict(new, loaded, weights=weights)  # rebuilt from the config: preset + file (sha256 checked)
    ref = new.copy()
    del ref.obsm["X_agl_tiny-ls"]
    agl.pp.embed_patches(ref, encoder="tiny-ls", weights=weights, patch_px=32, patch_um=32.0)
    np.testing.assert_array_equal(new.obsm["X_agl_tiny-ls"], ref.obsm["X_agl_tiny-ls"])


def test_predict_rebuilds_timm_kwargs_from_the_config(tmp_path):
    train = _image_slide(0)
    kw = {"img_size": 32, "depth": 2, "init_values": 1e-5, "mlp_layer": timm.layers.SwiGLUPacked}
    agl.pp.embed_patches(train, encoder="vit_tiny_patch16_224", encoder_kwargs=kw, patch_px=32, patch_um=32.0)
    key = "X_agl_vit_tiny_patch16_224"
    assert json.loads(train.uns["agl_embeddings"][key]["encoder_kwargs"])["mlp_layer"] == "SwiGLUPacked"
    model = agl.tl.agl_fit(train, method="pgl", embedding_key=key, n_targets=5, min_cells=1, **FAST)
    model.save(tmp_path / "m")
    new = _image_slide(1)
    out = agl.tl.predict_anndata(new, tmp_path / "m")
    ref = new.copy()
    agl.pp.embed_patches(ref, encoder="vit_tiny_patch16_224", encoder_kwargs=kw, patch_px=32, patch_um=32.0)
    np.testing.assert_array_equal(out.obsm[key], ref.obsm[key])
    # an embedding made with other timm kwargs is refused
    other = new.copy()
    agl.pp.embed_patches(other, encoder="vit_tiny_patch16_224", encoder_kwargs={**kw, "depth": 1}, patch_px=32,
                         patch_um=32.0)  # fmt: skip
    with pytest.raises(ValueError, match="encoder_kwargs"):
        agl.tl.predict_anndata(other, tmp_path / "m")


def test_custom_module_encoder_asks_for_the_module_at_predict(tmp_path):
    torch.manual_seed(4)
    module = _tiny_vit()
    train = _image_slide(0)
    agl.pp.embed_patches(train, encoder=module, patch_px=32, patch_um=32.0, key_added="X_vit")
    model = agl.tl.agl_fit(train, method="pgl", embedding_key="X_vit", n_targets=5, min_cells=1, **FAST)
    model.save(tmp_path / "m")
    new = _image_slide(1)
    with pytest.raises(ValueError, match=r"custom module encoder \('visiontransformer'\).*encoder=my_module"):
        agl.tl.agl_predict(new, tmp_path / "m")
    assert "agl_pred" not in new.layers
    agl.tl.agl_predict(new, tmp_path / "m", encoder=module)
    ref = new.copy()
    agl.pp.embed_patches(ref, encoder=module, patch_px=32, patch_um=32.0, key_added="X_vit2")
    np.testing.assert_array_equal(new.obsm["X_vit"], ref.obsm["X_vit2"])
    assert np.isfinite(new.layers["agl_pred"][:, new.var_names.isin(model.targets)]).all()


def test_timm_pretrained_weights_come_from_the_local_cache_offline(offline_empty_cache, tmp_path, waits):
    torch.manual_seed(5)
    ref = timm.create_model("resnet18", num_classes=1000).eval()
    save_file(ref.state_dict(), str(tmp_path / "r18.safetensors"))
    hub_id = timm.create_model("resnet18", num_classes=0).pretrained_cfg["hf_hub_id"]
    _fake_hub_repo(offline_empty_cache, hub_id, {"model.safetensors": (tmp_path / "r18.safetensors").read_bytes()})
    model, info = get_encoder("resnet18", pretrained=True)
    assert waits == [] and info["pretrained"] is True  # from the cache alone: no network, no retry
    ref.reset_classifier(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_finetuned_preset_model_loads_back_from_its_config(tiny_preset, tmp_path):
    train = _image_slide(0, n=24)
    model = agl.tl.agl_fit(
        train, method="pgl", mode="finetune", encoder="tiny-ls", encoder_kwargs={"depth": 1}, patch_px=32,
        patch_um=32.0, n_targets=3, min_cells=1, device="cpu", **{**FAST, "epochs": 1},
    )  # fmt: skip
    enc = model.config["encoder"]
    assert enc["preset"] == "tiny-ls" and json.loads(enc["encoder_kwargs"])["depth"] == 1
    model.save(tmp_path / "ft")
    loaded = agl.model.AGLModel.load(tmp_path / "ft")  # backbone rebuilt: the preset + the user's kwargs
    assert sum(k.endswith(".norm1.weight") for k in loaded.net.state_dict()) == 1
    new = _image_slide(1, n=24)
    a = agl.tl.predict_anndata(new, model)
    b = agl.tl.predict_anndata(new, loaded)
    np.testing.assert_array_equal(a.X, b.X)
