"""Encoders and embed_patches: shapes, determinism, local weights, callables, copy semantics, the .uns record."""

from __future__ import annotations

import hashlib
from importlib.metadata import version

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from builders import noise_slide
from torch import nn

import agl_scverse as agl
from agl_scverse.model import get_encoder, load_weights, normalize, register_encoder
from agl_scverse.pp import embed_patches, extract_patches

PX, UM = 32, 32.0


@pytest.fixture
def slide() -> ad.AnnData:
    return noise_slide()


def _batch(n=2, px=PX, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, px, px, generator=g)


def test_embed_shape_dtype_determinism_and_seed(slide):
    embed_patches(slide, encoder="resnet18", patch_px=PX, patch_um=UM, batch_size=4)
    X = slide.obsm["X_agl_resnet18"]
    assert X.shape == (10, 512) and X.dtype == np.float32 and np.isfinite(X).all()
    assert X.std(axis=0).max() > 0  # spots differ
    embed_patches(slide, encoder="resnet18", patch_px=PX, patch_um=UM, batch_size=4, key_added="again")
    np.testing.assert_array_equal(slide.obsm["again"], X)  # same input and seed -> identical features
    embed_patches(slide, encoder="resnet18", patch_px=PX, patch_um=UM, key_added="other_seed", seed=1)
    assert not np.allclose(slide.obsm["other_seed"], X)


def test_uns_record_contents_and_h5ad_roundtrip(slide, tmp_path):
    embed_patches(slide, encoder="resnet18", patch_px=PX, patch_um=UM)
    rec = slide.uns["agl_embeddings"]["X_agl_resnet18"]
    assert rec["encoder"] == "resnet18" and rec["feature_dim"] == 512 and rec["n_spots"] == 10
    assert rec["patch_px"] == PX and rec["patch_um"] == UM and rec["pad_mode"] == "constant"
    assert rec["mean"] == pytest.approx([0.485, 0.456, 0.406]) and rec["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert "weights_path" not in rec and "weights_sha256" not in rec and rec["pretrained"] is False  # None: left out
    assert rec["image"] == {"lib": "fullres"} and rec["crop_side_px"] == {"lib": 32}
    assert rec["versions"]["torch"] == version("torch") and rec["versions"]["timm"] == version("timm")
    slide.write_h5ad(tmp_path / "emb.h5ad")
    back = ad.read_h5ad(tmp_path / "emb.h5ad")
    assert back.uns["agl_embeddings"]["X_agl_resnet18"]["encoder"] == "resnet18"
    np.testing.assert_array_equal(back.obsm["X_agl_resnet18"], slide.obsm["X_agl_resnet18"])


def test_local_weights_file_reproduces_the_saved_model(tmp_path, slide):
    torch.manual_seed(3)
    ref = timm.create_model("resnet18", num_classes=1000)  # with a classifier, which loading must drop
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    ref.reset_classifier(0)
    ref.eval()
    model, info = get_encoder("resnet18", weights=path)
    assert info["weights_load"]["method"] == "name"
    assert info["weights_load"]["dropped_classifier"] == ["fc.weight", "fc.bias"]
    assert info["weights_load"]["missing"] == []
    assert info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    # embed_patches with the same file = the saved model on the normalised patches
    embed_patches(slide, encoder="resnet18", weights=str(path), patch_px=PX, patch_um=UM)
    patches = torch.from_numpy(extract_patches(slide, patch_px=PX, patch_um=UM)).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = ref(normalize(patches)).numpy()
    np.testing.assert_allclose(slide.obsm["X_agl_resnet18"], expected, rtol=1e-4, atol=1e-5)
    assert slide.uns["agl_embeddings"]["X_agl_resnet18"]["weights_sha256"] == info["weights_sha256"]


def test_weights_with_other_names_map_in_order(tmp_path):
    torch.manual_seed(4)
    ref = timm.create_model("resnet18", num_classes=0).eval()
    renamed = {f"blk{i:03d}_{k.replace('.', '_')}": v for i, (k, v) in enumerate(ref.state_dict().items())}
    renamed["_fc.weight"] = torch.zeros(7, 512)  # a classifier the model does not have
    renamed["_fc.bias"] = torch.zeros(7)
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    model = timm.create_model("resnet18", num_classes=0).eval()
    summary = load_weights(model, path)
    assert summary["method"] == "order" and summary["missing"] == [] and summary["unexpected"] == []
    assert summary["dropped_classifier"] == ["_fc.weight", "_fc.bias"]
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_weights_that_match_nothing_raise(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"foo.weight": torch.zeros(3, 3), "bar.bias": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="No tensor of .* matches"):
        get_encoder("resnet18", weights=path)
    with pytest.raises(FileNotFoundError):
        get_encoder("resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="either weights"):
        get_encoder("resnet18", weights=path, pretrained=True)


def test_unknown_encoder_name_suggests_close_names():
    with pytest.raises(ValueError, match="resnet18"):
        get_encoder("resnet_18x")


def test_callable_and_module_encoders(slide):
    def channel_means(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    embed_patches(slide, encoder=channel_means, patch_px=PX, patch_um=UM)
    patches = torch.from_numpy(extract_patches(slide, patch_px=PX, patch_um=UM)).permute(0, 3, 1, 2)
    expected = normalize(patches).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(slide.obsm["X_agl_channel_means"], expected, rtol=1e-5, atol=1e-6)
    pair = get_encoder(channel_means, mean=0.5, std=0.5)  # a (module, info) pair, e.g. after fine-tuning
    embed_patches(slide, encoder=pair, patch_px=PX, patch_um=UM, key_added="X_pair")
    expected_half = normalize(patches, 0.5, 0.5).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(slide.obsm["X_pair"], expected_half, rtol=1e-5, atol=1e-6)
    assert slide.uns["agl_embeddings"]["X_pair"]["mean"] == [0.5, 0.5, 0.5]

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.train()
    embed_patches(slide, encoder=net, patch_px=PX, patch_um=UM, key_added="X_net")
    assert slide.obsm["X_net"].shape == (10, 4)
    assert net.training  # the caller's module is handed back in the mode it came in
    with torch.no_grad():
        np.testing.assert_allclose(slide.obsm["X_net"], net.eval()(normalize(patches)).numpy(), rtol=1e-4, atol=1e-5)


def test_register_encoder_and_mean_std(slide):
    register_encoder("half_mean", lambda: lambda x: x.mean(dim=(2, 3)), mean=0.5, std=0.5, overwrite=True)
    _, info = get_encoder("half_mean")
    assert info["mean"] == [0.5, 0.5, 0.5] and info["source"] == "registry"
    assert "half_mean" in agl.model.list_encoders()
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("half_mean", lambda: nn.Identity())
    embed_patches(slide, encoder="half_mean", patch_px=PX, patch_um=UM)
    assert slide.uns["agl_embeddings"]["X_agl_half_mean"]["mean"] == [0.5, 0.5, 0.5]


def test_copy_leaves_input_unchanged(slide):
    before_obsm, before_uns = set(slide.obsm), set(slide.uns)
    out = embed_patches(slide, encoder="resnet18", patch_px=PX, patch_um=UM, copy=True)
    assert isinstance(out, ad.AnnData) and out is not slide
    assert "X_agl_resnet18" in out.obsm and "agl_embeddings" in out.uns
    assert set(slide.obsm) == before_obsm and set(slide.uns) == before_uns
    assert embed_patches(slide, encoder="resnet18", patch_px=PX, patch_um=UM) is None
    assert "X_agl_resnet18" in slide.obsm


def test_nothing_written_on_failure(slide):
    before_obsm, before_uns = set(slide.obsm), set(slide.uns)
    with pytest.raises(ValueError, match=r"\(B, D\)"):  # a feature map, not pooled features
        embed_patches(slide, encoder=lambda x: x, patch_px=PX, patch_um=UM)
    slide.obsm["spatial"][0] = [-500, -500]
    with pytest.raises(ValueError, match="on_outside='pad'"):
        embed_patches(slide, encoder="resnet18", patch_px=PX, patch_um=UM)
    with pytest.raises(ValueError, match="NaN"):
        embed_patches(
            slide, encoder=lambda x: x.mean(dim=(2, 3)) * float("nan"), patch_px=PX, patch_um=UM, on_outside="pad"
        )
    assert set(slide.obsm) == before_obsm and set(slide.uns) == before_uns
    embed_patches(slide, encoder="resnet18", patch_px=PX, patch_um=UM, on_outside="pad")
    assert slide.uns["agl_embeddings"]["X_agl_resnet18"]["n_outside"] == 1


def _her2st_section(her2st_dir, n_spots: int) -> ad.AnnData:
    """One HER2+ section via agl.io.read_legacy_st when available, else a minimal AnnData from the files."""
    reader = getattr(agl.io, "read_legacy_st", None)
    if reader is not None:
        adata = reader(her2st_dir, sections=["C2"], load_images=False)
    else:  # pragma: no cover - before the reader exists
        from scipy.spatial import cKDTree

        spots = pd.read_csv(her2st_dir / "C2" / "spots.tsv", sep="\t")
        xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
        d = cKDTree(xy).query(xy, k=2)[0][:, 1]
        adata = ad.AnnData(
            np.zeros((len(xy), 1), dtype=np.float32),
            obs=pd.DataFrame(index=[f"C2_{x}x{y}" for x, y in zip(spots.x, spots.y)]),
            obsm={"spatial": xy},
            uns={
                "spatial": {
                    "C2": {
                        "images": {},
                        "scalefactors": {"microns_per_pixel": 200.0 / float(np.median(d))},
                        "metadata": {"source_image_path": str(her2st_dir / "C2" / "he.jpg")},
                    }
                }
            },
        )
    return adata[:n_spots].copy()


@pytest.mark.slow
@pytest.mark.shared
def test_densenet121_local_weights_on_her2st(her2st_dir, densenet_weights):
    adata = _her2st_section(her2st_dir, 24)
    embed_patches(adata, encoder="densenet121", weights=densenet_weights, patch_px=96, patch_um=112, batch_size=12)
    X = adata.obsm["X_agl_densenet121"]
    assert X.shape == (24, 1024) and X.dtype == np.float32
    assert np.isfinite(X).all()
    assert (X.std(axis=0) > 1e-6).sum() > 500  # features vary across spots
    rec = adata.uns["agl_embeddings"]["X_agl_densenet121"]
    assert rec["weights_sha256"] == "7a46569badf7242317c17b5610f1a33b90bd0f96aa373e396f6b4f050e3c1596"
    assert rec["weights_load"] == "name" and rec["image"]["C2"] == "fullres"


def test_embed_patches_refuses_a_key_added_that_holds_other_data(slide, monkeypatch):
    """key_added="spatial" would replace the spot coordinates with features; refused before the encoder runs."""
    import agl_scverse.pp._embed as emb

    xy = slide.obsm["spatial"].copy()
    monkeypatch.setattr(emb, "_encode", lambda *a, **k: pytest.fail("encoded before the key was checked"))
    with pytest.raises(ValueError, match=r"\.obsm\['spatial'\] already exists and was not written by agl-scverse"):
        embed_patches(slide, encoder="resnet18", patch_px=PX, patch_um=UM, key_added="spatial")
    np.testing.assert_array_equal(slide.obsm["spatial"], xy)
    assert "agl_embeddings" not in slide.uns


def test_encoder_config_replaces_the_encoder_keywords(slide):
    """encoder=EncoderConfig(...) (or a dict) embeds as the old keywords did; those warn with the new spelling."""
    import inspect
    import warnings

    old_names = ("weights", "patch_px", "patch_um", "batch_size", "precision", "backend", "num_workers", "tta")
    assert not set(old_names) & set(inspect.signature(embed_patches).parameters)  # one place per idea
    a, b, c = slide.copy(), slide.copy(), slide.copy()
    with pytest.warns(FutureWarning) as caught:
        embed_patches(a, "resnet18", patch_px=PX, patch_um=UM, precision="fp32", backend="torch", device="cpu")
    msg = str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller
    assert msg.startswith("embed_patches(patch_px=, patch_um=, precision=, backend=) is deprecated")
    assert "use encoder=agl.EncoderConfig('resnet18', patch_px=..., patch_um=..., precision=..., backend=...)" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        cfg = agl.EncoderConfig("resnet18", patch_px=PX, patch_um=UM, precision="fp32", backend="torch")
        embed_patches(b, cfg, device="cpu")
        embed_patches(c, encoder={"encoder": "resnet18", "patch_px": PX, "patch_um": UM, "precision": "fp32",
                                  "backend": "torch"}, device="cpu")  # fmt: skip
    for other in (b, c):
        np.testing.assert_array_equal(other.obsm["X_agl_resnet18"], a.obsm["X_agl_resnet18"])
        rec, ref = other.uns["agl_embeddings"]["X_agl_resnet18"], a.uns["agl_embeddings"]["X_agl_resnet18"]
        assert {k: str(v) for k, v in rec.items()} == {k: str(v) for k, v in ref.items()}
    with pytest.raises(TypeError, match="patch_px is given twice"):
        embed_patches(slide.copy(), {"patch_px": PX}, patch_px=PX)
    with pytest.raises(TypeError, match="patch_px is given twice"):  # in a config too, as agl_fit's keywords
        embed_patches(slide.copy(), agl.EncoderConfig(patch_px=64), patch_px=PX)
    with pytest.raises(TypeError, match="no field"):
        embed_patches(slide.copy(), {"patch_pixels": PX})


def test_a_feature_size_that_changes_between_batches_is_named_in_order(slide):
    calls = []

    def shrinking(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.mean(dim=(2, 3))[:, : 4 - len(calls)]  # 3 features, then 2

    with pytest.raises(ValueError, match="returned 3 features, then 2"):
        embed_patches(slide, encoder=shrinking, patch_px=PX, patch_um=UM, batch_size=4)
