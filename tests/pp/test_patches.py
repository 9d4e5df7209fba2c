"""Spot patches: centring, physical scale, padding, outside spots, image fallbacks, HEST patch files."""

from __future__ import annotations

import pickle

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import agl_scverse as agl
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


def test_hires_fallback_warns_and_still_centres():
    full_xy = np.array([[60, 60], [180, 80], [100, 200]])
    hires = _marker_image((120, 125), full_xy // 2, half=2)  # hires image at scale 0.5
    adata = _slide(hires, full_xy, mpp=1.0, which="hires", scalef=0.5)
    with pytest.warns(UserWarning, match="full-resolution"):
        ds = SpotPatches(adata, patch_px=32, patch_um=22)
    assert ds.image_kind == {"s1": "hires"} and ds.crop_side == {"s1": 11}
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
