"""Spot patches: centring, physical scale, padding, outside spots, image fallbacks, HEST patch files."""

from __future__ import annotations

import pickle

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

import agl_scverse as agl
from agl_scverse._images import tile_cache
from agl_scverse.model import normalize
from agl_scverse.pp import SpotPatches, extract_patches, iter_patch_batches, patch_loader

COLOURS = np.array([[255, 0, 0], [0, 160, 0], [0, 0, 255], [200, 0, 200], [0, 200, 200]], dtype=np.uint8)


def _slide(img, xy, mpp=1.0, which="fullres", scalef=None, lib="s1", names=None) -> ad.AnnData:
    sf = {"microns_per_pixel": mpp}
    if scalef is not None:
        sf["tissue_hires_scalef"] = scalef
    n = len(xy)
    return ad.AnnData(
        np.ones((n, 2), dtype=np.float32),
        obs=pd.DataFrame(index=names if names is not None else [f"spot{i}" for i in range(n)]),
        obsm={"spatial": np.asarray(xy, dtype=float)},
        uns={"spatial": {lib: {"images": {which: img}, "scalefactors": sf}}},
    )


def _marker_image(shape, centres, half, colours=COLOURS):
    """White image with a (2*half+1)-pixel coloured square centred on each (x, y)."""
    img = np.full((*shape, 3), 255, dtype=np.uint8)
    for (x, y), c in zip(np.asarray(centres, dtype=int), colours):
        img[y - half : y + half + 1, x - half : x + half + 1] = c
    return img


def _marker_mask(patch_chw: torch.Tensor, colour, tol=40) -> np.ndarray:
    p = patch_chw.permute(1, 2, 0).numpy().astype(int)
    return np.all(np.abs(p - colour.astype(int)) <= tol, axis=-1)


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


XY = np.array([[30, 30], [90, 40], [50, 95], [100, 100], [65, 60]])


def test_patches_are_centred_on_spots():
    img = _marker_image((130, 140), XY, half=3)
    adata = _slide(img, XY)
    ds = SpotPatches(adata, patch_px=32, patch_um=21)
    assert len(ds) == 5 and ds.crop_side == {"s1": 21}
    for i, colour in enumerate(COLOURS):
        patch = ds[i]
        assert patch.shape == (3, 32, 32) and patch.dtype == torch.uint8
        centre = patch[:, 14:18, 14:18].permute(1, 2, 0).reshape(-1, 3).numpy().astype(int)
        assert np.all(np.abs(centre - colour) <= 2), f"spot {i}: centre is not the marker colour"
        mask = _marker_mask(patch, colour)
        np.testing.assert_allclose(_centroid(mask), [15.5, 15.5], atol=0.6)
        assert patch[:, 0, 0].tolist() == [255, 255, 255]  # corners are background
    np.testing.assert_array_equal(ds.inside_fraction, 1.0)


def test_spot_subset_and_names_order():
    img = _marker_image((130, 140), XY, half=3)
    adata = _slide(img, XY)
    ds = SpotPatches(adata, patch_px=21, patch_um=21, spots=["spot3", "spot1"])
    assert list(ds.obs_names) == ["spot3", "spot1"]
    assert ds.spot_index.tolist() == [3, 1]
    assert ds[0][:, 10, 10].tolist() == COLOURS[3].tolist()
    ds_mask = SpotPatches(adata, patch_px=21, patch_um=21, spots=np.array([True, False, False, False, True]))
    assert list(ds_mask.obs_names) == ["spot0", "spot4"]
    with pytest.raises(KeyError, match="not in adata.obs_names"):
        SpotPatches(adata, spots=["nope"])


def test_crop_side_follows_microns_per_pixel_per_library():
    centres = np.array([[60, 60]])
    img = _marker_image((120, 120), centres, half=4)
    a1 = _slide(img, centres, mpp=1.0, lib="coarse", names=["a"])
    a2 = _slide(img, centres, mpp=0.5, lib="fine", names=["b"])
    adata = ad.concat([a1, a2], label="library_id", keys=["coarse", "fine"], uns_merge="unique")
    adata.uns["spatial"] = {**a1.uns["spatial"], **a2.uns["spatial"]}
    ds = SpotPatches(adata, patch_px=32, patch_um=32)  # several libraries: obs["library_id"] by default
    assert ds.crop_side == {"coarse": 32, "fine": 64}
    n_coarse = _marker_mask(ds[0], COLOURS[0]).sum()  # 9 x 9 marker, no resize
    n_fine = _marker_mask(ds[1], COLOURS[0]).sum()  # same marker seen through a 2x larger crop
    assert n_coarse == 81
    assert 3.0 < n_coarse / n_fine < 5.5
    for i in range(2):
        np.testing.assert_allclose(_centroid(_marker_mask(ds[i], COLOURS[0])), [15.5, 15.5], atol=0.6)


def _gradient(h=20, w=20):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 10, yy * 10, np.full_like(xx, 7)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
def test_padding_policies(mode):
    img = _gradient()
    adata = _slide(img, [[1, 1]])  # 9-px patch reaches 3 px beyond the top-left corner
    ds = SpotPatches(adata, patch_px=9, patch_um=9, pad_mode=mode, pad_value=(0, 0, 250), min_inside=0.4)
    assert ds.inside_fraction[0] == pytest.approx(36 / 81)
    p = ds[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(p[3:, 3:], img[0:6, 0:6])  # the inside part is the image
    if mode == "constant":
        assert np.all(p[:3, :] == [0, 0, 250]) and np.all(p[:, :3] == [0, 0, 250])
    elif mode == "edge":
        np.testing.assert_array_equal(p[0, 3:], img[0, 0:6])
        np.testing.assert_array_equal(p[3:, 0], img[0:6, 0])
        np.testing.assert_array_equal(p[0, 0], img[0, 0])
    else:  # mirror without repeating the edge pixel: columns 0, 1, 2 are image columns 3, 2, 1
        np.testing.assert_array_equal(p[3:, 0], img[0:6, 3])
        np.testing.assert_array_equal(p[3:, 2], img[0:6, 1])
        np.testing.assert_array_equal(p[1, 3:], img[2, 0:6])
    assert ds.record()["pad_mode"] == mode and ds.record()["n_padded"] == 1


def test_outside_spots_error_lists_them_and_pad_keeps_them(monkeypatch):
    img = np.full((50, 50, 3), 100, dtype=np.uint8)
    adata = _slide(img, [[25, 25], [-40, 10], [49, 49]], names=["in", "far", "corner"])
    with pytest.raises(ValueError, match=r"2 of 3 spots.*'far', 'corner'.*on_outside='pad'"):
        SpotPatches(adata, patch_px=8, patch_um=10)
    warned: list[str] = []
    monkeypatch.setattr(agl.pp._patches.logg, "warning", lambda msg, *a, **k: warned.append(msg))
    ds = SpotPatches(adata, patch_px=10, patch_um=10, on_outside="pad")
    assert len(warned) == 1 and "Keeping them" in warned[0] and "'far', 'corner'" in warned[0]
    assert list(ds.outside) == ["far", "corner"]
    np.testing.assert_allclose(ds.inside_fraction, [1.0, 0.0, 0.25])
    assert len(ds) == 3  # nothing dropped
    assert torch.all(ds[1] == 255)  # entirely outside: white
    assert torch.all(ds[2][:, :5, :5] == 100) and torch.all(ds[2][:, 5:, :] == 255)
    with pytest.raises(ValueError, match="on_outside"):
        SpotPatches(adata, on_outside="drop")


def test_hires_fallback_is_refused_unless_allowed_and_still_centres():
    full_xy = np.array([[60, 60], [180, 80], [100, 200]])
    hires = _marker_image((120, 125), full_xy // 2, half=2)  # hires image at scale 0.5
    adata = _slide(hires, full_xy, mpp=1.0, which="hires", scalef=0.5)
    with pytest.raises(ValueError, match=r"no full-resolution image.*2 µm/px.*allow_lowres=True"):
        SpotPatches(adata, patch_px=32, patch_um=22)  # 0.69 µm/px patches from a 2 µm/px thumbnail
    with pytest.warns(UserWarning, match="full-resolution"):
        ds = SpotPatches(adata, patch_px=32, patch_um=22, allow_lowres=True)
    assert ds.image_kind == {"s1": "hires"} and ds.crop_side == {"s1": 11}
    assert ds.source_um_per_px == {"s1": 2.0} and ds.record()["source_um_per_px"] == {"s1": 2.0}
    # a thumbnail at least as fine as the patches loses nothing: accepted without asking
    assert SpotPatches(adata, patch_px=8, patch_um=22).source_um_per_px == {"s1": 2.0}
    for i in range(3):
        mask = _marker_mask(ds[i], COLOURS[i])
        assert mask[15:17, 15:17].all()
        np.testing.assert_allclose(_centroid(mask), [15.5, 15.5], atol=0.6)


def test_grayscale_image_is_rejected():
    adata = _slide(np.zeros((40, 40), dtype=np.uint8), [[20, 20]])
    with pytest.raises(ValueError, match="grayscale"):
        SpotPatches(adata, patch_px=8, patch_um=8)


def test_bad_arguments_raise_clear_errors():
    adata = _slide(np.zeros((40, 40, 3), dtype=np.uint8), [[20, 20]])
    with pytest.raises(ValueError, match="pad_mode"):
        SpotPatches(adata, pad_mode="wrap")
    with pytest.raises(ValueError, match="patch_um"):
        SpotPatches(adata, patch_um=-1)
    with pytest.raises(ValueError, match="patch_px"):
        SpotPatches(adata, patch_px=0)
    with pytest.raises(ValueError, match="pad_value"):
        SpotPatches(adata, pad_value=300)


def test_hest_patch_file_is_used_and_resized(tmp_path):
    path = tmp_path / "patches.h5"
    tiles = np.stack([np.full((224, 224, 3), c, dtype=np.uint8) for c in COLOURS[:3]])
    with h5py.File(path, "w") as f:
        f["img"] = tiles
    adata = _slide(np.zeros((10, 10, 3), dtype=np.uint8), [[5, 5]] * 3)
    adata.uns["spatial"]["s1"]["metadata"] = {"patches_h5": str(path)}
    adata.obs["hest_patch_index"] = [2, 0, 1]
    ds = SpotPatches(adata, patch_px=48, patch_um=112)
    assert ds.image_kind == {"s1": "patches_h5"}
    for i, row in enumerate([2, 0, 1]):
        assert ds[i].shape == (3, 48, 48)
        assert torch.all(ds[i] == torch.from_numpy(COLOURS[row]).view(3, 1, 1))
    assert torch.equal(pickle.loads(pickle.dumps(ds))[0], ds[0])  # h5 handle reopened after pickling
    # another physical size cannot use the 112 µm HEST tiles: cut from the image instead
    ds2 = SpotPatches(adata, patch_px=4, patch_um=4)
    assert ds2.image_kind == {"s1": "fullres"}


def test_pickled_dataset_rereads_images_and_loaders_batch():
    img = _marker_image((130, 140), XY, half=3)
    ds = SpotPatches(_slide(img, XY), patch_px=16, patch_um=21)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.level == {"s1": 0} and ds.record()["level"] == {"s1": 0}
    for i in range(len(ds)):
        assert torch.equal(clone[i], ds[i])
    batches = list(patch_loader(ds, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 2, 1] and batches[0].dtype == torch.uint8
    stacked = torch.cat(list(iter_patch_batches(ds, batch_size=3)))
    assert torch.equal(stacked, torch.cat(batches))
    arr = extract_patches(_slide(img, XY), patch_px=16, patch_um=21)
    assert arr.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(arr[2], ds[2].permute(1, 2, 0).numpy())


def test_normalize():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 1, 2).contiguous()
    y = normalize(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert y.dtype == torch.float32 and y.shape == x.shape
    np.testing.assert_allclose(y[0, :, 0, 0].numpy(), [-2.0, -1.0, -0.5])
    np.testing.assert_allclose(y[0, :, 0, 1].numpy(), [2.0, 1.0, 0.5])
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float())
    with pytest.raises(ValueError, match="std"):
        normalize(x, std=(0, 1, 1))
    assert agl.model.normalize is normalize


# --- slide images read by region ----------------------------------------------------------------------------
def _texture(h, w, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 3) % 256, (yy * 5) % 256, (xx + yy) % 256], axis=-1)
    return (base + rng.integers(0, 20, size=(h, w, 3))).clip(0, 255).astype(np.uint8)


def _write_pyramid(path, img, n_levels=3) -> list[np.ndarray]:
    levels = [img[:: 2**i, :: 2**i] for i in range(n_levels)]
    kw = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], subifds=n_levels - 1, **kw)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **kw)
    return levels


def _file_slide(path, xy, mpp=1.0, lib="s1") -> ad.AnnData:
    adata = _slide(np.zeros((4, 4, 3), dtype=np.uint8), xy, mpp=mpp, which="lowres", lib=lib)
    adata.uns["spatial"][lib]["metadata"] = {"source_image_path": str(path)}
    return adata


EDGE_XY = np.array([[40, 50], [3, 4], [255, 150], [130, 297], [200, 222], [64, 64]])


@pytest.mark.usefixtures("_own_caches")
@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
def test_tiff_and_png_patches_equal_in_memory_patches(tmp_path, mode):
    img = _texture(300, 260)
    _write_pyramid(tmp_path / "slide.tif", img)
    Image.fromarray(img).save(tmp_path / "slide.png")
    kw = {"patch_px": 24, "patch_um": 21, "pad_mode": mode, "min_inside": 0.2, "on_outside": "pad"}
    ref = SpotPatches(_slide(img, EDGE_XY), **kw)
    for name in ("slide.tif", "slide.png"):
        ds = SpotPatches(_file_slide(tmp_path / name, EDGE_XY), **kw)
        assert ds.image_kind == {"s1": "fullres"} and ds.level == {"s1": 0} and ds.crop_side == ref.crop_side
        np.testing.assert_array_equal(ds.inside_fraction, ref.inside_fraction)
        assert ds.inside_fraction.min() < 1  # some patches are padded
        for i in range(len(ds)):
            assert torch.equal(ds[i], ref[i]), (name, i)
        clone = pickle.loads(pickle.dumps(ds))
        assert torch.equal(clone[2], ref[2])


@pytest.mark.usefixtures("_own_caches")
def test_building_the_dataset_decodes_nothing(tmp_path, monkeypatch):
    from agl_scverse._images import DecodedFileSource

    img = _texture(300, 260)
    _write_pyramid(tmp_path / "slide.tif", img)
    Image.fromarray(img).save(tmp_path / "slide.jpg", quality=95)
    calls = []
    monkeypatch.setattr(DecodedFileSource, "_decode_to", lambda self, target: calls.append(target))
    SpotPatches(_file_slide(tmp_path / "slide.jpg", EDGE_XY[:1]), patch_px=16, patch_um=21)
    SpotPatches(_file_slide(tmp_path / "slide.tif", EDGE_XY[:1]), patch_px=16, patch_um=21)
    assert calls == [] and len(tile_cache()) == 0


@pytest.mark.usefixtures("_own_caches")
def test_coarser_patches_are_read_from_the_matching_pyramid_level(tmp_path):
    img = _texture(300, 260)
    levels = _write_pyramid(tmp_path / "slide.tif", img)
    xy = EDGE_XY[[0, 4, 5]]
    # 32 µm in 16 px: 2 µm/px, twice the image's 1 µm/px -> the 2x level, a 16 px crop, no resize
    ds = SpotPatches(_file_slide(tmp_path / "slide.tif", xy, mpp=1.0), patch_px=16, patch_um=32)
    assert ds.level == {"s1": 1} and ds.level_downsample == {"s1": 2.0} and ds.crop_side == {"s1": 16}
    rec = ds.record()
    assert rec["level"] == {"s1": 1} and rec["level_downsample"] == {"s1": 2.0}
    # same pixels as cutting the level-1 image directly, with spot centres mapped to its pixel grid
    ref = SpotPatches(_slide(levels[1], (xy - 0.5) / 2.0, mpp=2.0), patch_px=16, patch_um=32)
    for i in range(len(ds)):
        assert torch.equal(ds[i], ref[i])
    assert {key[-3] for key in tile_cache()._items} == {1}  # level 0 was never decoded (keys end: level, row, col)
    # slightly finer than 2 µm/px: the 2x level would be coarser, so level 0 (and a resize) is used
    fine = SpotPatches(_file_slide(tmp_path / "slide.tif", xy, mpp=1.0), patch_px=17, patch_um=32)
    assert fine.level == {"s1": 0} and fine.crop_side == {"s1": 32}
    # 4x coarser patches: level 2
    assert SpotPatches(_file_slide(tmp_path / "slide.tif", xy), patch_px=8, patch_um=32).level == {"s1": 2}


@pytest.mark.usefixtures("_own_caches")
def test_uint16_images_give_rescaled_patches_not_white_ones(tmp_path):
    img = _texture(120, 120)
    deep = img.astype(np.uint16) * 257  # values up to 65535
    tifffile.imwrite(tmp_path / "deep.tif", deep, photometric="rgb", tile=(64, 64))
    xy = np.array([[40, 40], [80, 70]])
    ref = SpotPatches(_slide(img, xy), patch_px=16, patch_um=21)
    for adata in (_slide(deep, xy), _file_slide(tmp_path / "deep.tif", xy)):
        ds = SpotPatches(adata, patch_px=16, patch_um=21)
        for i in range(len(ds)):
            assert not torch.all(ds[i] == 255)
            assert torch.equal(ds[i], ref[i])


@pytest.mark.usefixtures("_own_caches")
def test_embed_patches_with_workers_gives_the_same_features(tmp_path):
    img = _texture(300, 260)
    _write_pyramid(tmp_path / "slide.tif", img)
    Image.fromarray(_texture(200, 220, seed=3)).save(tmp_path / "other.png")
    a = _file_slide(tmp_path / "slide.tif", EDGE_XY[[0, 4, 5]], lib="tif")
    b = _file_slide(tmp_path / "other.png", np.array([[50, 60], [150, 100], [100, 150]]), lib="png")
    adata = ad.concat([a, b], label="library_id", keys=["tif", "png"], index_unique="-")
    adata.uns["spatial"] = {**a.uns["spatial"], **b.uns["spatial"]}
    kw = {"encoder": "resnet18", "patch_px": 32, "patch_um": 48, "batch_size": 2, "library_key": "library_id"}
    serial = agl.pp.embed_patches(adata, num_workers=0, copy=True, **kw)
    parallel = agl.pp.embed_patches(adata, num_workers=2, prefetch_factor=1, copy=True, **kw)
    np.testing.assert_array_equal(parallel.obsm["X_agl_resnet18"], serial.obsm["X_agl_resnet18"])
    rec = serial.uns["agl_embeddings"]["X_agl_resnet18"]
    assert rec["level"] == {"tif": 0, "png": 0}  # 1.5 µm/px patches of a 1 µm/px slide: level 0 (no 1.5x level)
    with pytest.raises(ValueError, match="prefetch_factor"):
        agl.pp.embed_patches(adata, prefetch_factor=0, **kw)


def _big_tiff(path, size=8000, tile=256) -> None:
    """A size x size JPEG-tiled TIFF written tile by tile (never whole in memory)."""
    n = -(-size // tile)

    def tiles():
        yy, xx = np.mgrid[0:tile, 0:tile]
        for ty in range(n):
            for tx in range(n):
                t = np.empty((tile, tile, 3), dtype=np.uint8)
                t[..., 0] = (xx + 7 * tx) % 256
                t[..., 1] = (yy + 11 * ty) % 256
                t[..., 2] = 128
                yield t

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg")  # fmt: skip


@pytest.mark.usefixtures("_own_caches")
def test_embedding_a_large_tiff_never_allocates_the_image(tmp_path, monkeypatch):
    import tracemalloc

    from agl_scverse import _images
    from agl_scverse._images import _tile_cache

    _big_tiff(tmp_path / "big.tif")
    grid = np.linspace(150, 7850, 8)
    xy = np.array([[x, y] for y in grid for x in grid])  # 64 spots all over the 8000 x 8000 image (192 MB decoded)
    adata = _file_slide(tmp_path / "big.tif", xy, mpp=0.5)
    monkeypatch.setattr(_tile_cache, "_TILE_CACHE", _images.TileCache(max_bytes=16 * 2**20))

    def means(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    tracemalloc.start()
    try:
        # 112 µm at 0.5 µm/px: 224 px crops from level 0, every tile touched decoded at full resolution
        agl.pp.embed_patches(adata, encoder=means, patch_px=224, patch_um=112, batch_size=8)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        src = _images.open_image(tmp_path / "big.tif")
        src.read_region(0, 0, 8000, 1000)  # control: a 24 MB band is seen by the measurement
        _, band_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert adata.obsm["X_agl_means"].shape == (64, 3)
    assert adata.uns["agl_embeddings"]["X_agl_means"]["level"] == {"s1": 0}
    assert band_peak > 24 * 2**20
    assert peak < 48 * 2**20, f"embedding allocated {peak / 2**20:.0f} MB (a full decode is 192 MB)"


# --- sub-pixel centres (issue 20: integer vs float centres changed predictions by up to 0.85) --------------------
def _smooth_image(h=80, w=90, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    chans = [127 + 100 * np.sin(xx / (4 + c) + rng.uniform(0, 6)) * np.cos(yy / (5 + c)) for c in range(3)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("side", [11, 12])
def test_a_half_pixel_centre_is_the_bilinear_half_shift_of_the_whole_pixel_patch(side):
    img = _smooth_image()
    c = np.array([40.0, 35.0])
    whole = SpotPatches(_slide(img, [c]), patch_px=side, patch_um=side)
    assert whole.crop_side == {"s1": side}
    x0, y0 = whole._box[0]
    np.testing.assert_array_equal(whole.patch_array(0), img[y0 : y0 + side, x0 : x0 + side])  # cut, not resampled
    wide = img[y0 : y0 + side + 1, x0 : x0 + side + 1].astype(float)
    for dx, dy in [(0.5, 0.0), (0.0, 0.5), (0.5, 0.5), (0.25, 0.75)]:
        ds = SpotPatches(_slide(img, [c + [dx, dy]]), patch_px=side, patch_um=side)
        shifted = wide[:, :-1] * (1 - dx) + wide[:, 1:] * dx
        shifted = shifted[:-1] * (1 - dy) + shifted[1:] * dy
        np.testing.assert_allclose(ds.patch_array(0).astype(float), shifted, atol=0.51)
        np.testing.assert_allclose(ds[0].permute(1, 2, 0).numpy().astype(float), shifted, atol=1.01)  # PIL, fixed point
    # a whole-pixel offset by resampling equals the cut of the next pixel: the patch moves continuously
    nxt = SpotPatches(_slide(img, [c + [1.0, 0.0]]), patch_px=side, patch_um=side).patch_array(0)
    near = SpotPatches(_slide(img, [c + [0.9999, 0.0]]), patch_px=side, patch_um=side).patch_array(0)
    np.testing.assert_array_equal(near, nxt)  # within SUBPIXEL_TOLERANCE: snapped


def test_centres_off_by_less_than_half_a_pixel_give_nearly_equal_patches_and_features():
    """A float centre and its rounded integer give patches (and embeddings) much closer than a one-pixel jump."""
    img = _smooth_image(seed=1)
    rng = np.random.default_rng(0)
    centres = rng.uniform(25, 55, size=(12, 2))
    ints = np.round(centres)
    kw = {"patch_px": 32, "patch_um": 24}
    f_ds, i_ds = SpotPatches(_slide(img, centres), **kw), SpotPatches(_slide(img, ints), **kw)
    jump = SpotPatches(_slide(img, ints + [1.0, 1.0]), **kw)  # one pixel over (both axes)
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    with torch.no_grad():
        feats = [enc(torch.stack([d[i] for i in range(len(d))]).float() / 255).flatten(1) for d in (f_ds, i_ds, jump)]
    for i in range(len(centres)):
        d_float = np.abs(f_ds[i].float() - i_ds[i].float()).mean()
        d_jump = np.abs(jump[i].float() - i_ds[i].float()).mean()
        assert d_float < d_jump
    d_f = (feats[0] - feats[1]).norm(dim=1)
    d_j = (feats[2] - feats[1]).norm(dim=1)
    assert float(d_f.median()) < 0.6 * float(d_j.median())
