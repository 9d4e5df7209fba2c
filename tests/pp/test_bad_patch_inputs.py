"""Patch requests too large for memory are refused up front with the numbers; replaced images are read anew."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from builders import FAST, assert_unchanged, he_like, snapshot
from PIL import Image

import agl_scverse as agl
from agl_scverse.pp import SpotPatches
from agl_scverse.pp._patches import MAX_BATCH_BYTES, MAX_PATCH_BYTES, check_patch_batch, patch_bytes

XY = np.array([[40.0, 40.0], [80.0, 70.0], [60.0, 60.0]])


def _slide(img=None, path=None) -> ad.AnnData:
    images = {"fullres": img} if img is not None else {"lowres": np.zeros((4, 4, 3), dtype=np.uint8)}
    entry = {"images": images, "scalefactors": {"microns_per_pixel": 1.0}}
    if path is not None:
        entry["metadata"] = {"source_image_path": str(path)}
    rng = np.random.default_rng(0)
    return ad.AnnData(
        rng.poisson(3.0, size=(len(XY), 4)).astype(np.float32),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(len(XY))]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(4)]),
        obsm={"spatial": XY.copy()},
        uns={"spatial": {"lib": entry}},
    )


# ------------------------------------------------------------------------------------------------ 9. memory guards
def test_limits_are_module_constants_and_the_estimate_is_stated():
    assert MAX_PATCH_BYTES == 2 * 2**30 and MAX_BATCH_BYTES == 4 * 2**30
    assert patch_bytes(100, 10) == 3 * (6 * 100**2 + 5 * 10**2)
    check_patch_batch(224, 512)  # agl_predict's default batch of default patches
    check_patch_batch(4096, 1)
    check_patch_batch(224, 2048)  # fits without the read-ahead's batches ...
    with pytest.raises(ValueError, match="made ahead"):
        check_patch_batch(224, 2048, ahead=2)  # ... not with them


@pytest.mark.parametrize("pad", ["error", "pad"])
def test_a_huge_patch_um_is_refused_when_the_dataset_is_built(pad):
    adata = _slide(he_like(120, 120))
    snap = snapshot(adata)
    with pytest.raises(ValueError, match=r"100000 x 100000 px crop.*167\.6 GiB.*2 GiB limit.*MAX_PATCH_BYTES"):
        SpotPatches(adata, patch_px=224, patch_um=1e5, on_outside=pad)
    with pytest.raises(ValueError, match="MAX_PATCH_BYTES"):
        agl.pp.embed_patches(adata, encoder="resnet18", patch_um=1e5, on_outside=pad)
    assert_unchanged(adata, snap)


def test_a_huge_patch_px_batch_is_refused_before_the_encoder_runs(monkeypatch):
    adata = _slide(he_like(120, 120))
    snap = snapshot(adata)
    from agl_scverse.pp import _embed

    monkeypatch.setattr(_embed, "get_encoder", lambda *a, **k: pytest.fail("the encoder was built"))
    # 1 uint8 batch + float32 input and its normalised copy + the 2 float32 batches the read-ahead thread makes
    with pytest.raises(
        ValueError, match=r"32 patches of 4096 x 4096 px needs about 25\.5 GiB.*made ahead.*at most 5 here"
    ):
        agl.pp.embed_patches(adata, encoder="resnet18", patch_px=4096, patch_um=40)
    with pytest.raises(ValueError, match=r"about 16\.5 GiB.*3 uint8 batch"):  # 3 workers x 1 prefetched
        agl.pp.embed_patches(adata, encoder="resnet18", patch_px=4096, patch_um=40, num_workers=3, prefetch_factor=1)
    assert_unchanged(adata, snap)


def test_finetune_agl_fit_refuses_a_huge_patch_batch_before_training():
    kw = {"n_tissue_genes": 10, "n_informative": 10, "n_noise": 20, "n_bursty_noise": 2}
    adata = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=0, **kw)
    snap = snapshot(adata)
    with pytest.raises(ValueError, match="patches of 4096 x 4096 px"):
        agl.tl.agl_fit(adata, method="pgl", mode="finetune", patch_px=4096, n_targets=3, min_cells=1, **FAST)
    assert_unchanged(adata, snap)


# ------------------------------------------------------------------------------------------------ 7. replaced files
@pytest.mark.usefixtures("_own_caches")
@pytest.mark.parametrize("suffix", ["jpg", "tif"])
def test_a_replaced_image_file_gives_a_new_embedding_in_the_same_process(tmp_path, suffix):
    path = tmp_path / f"he.{suffix}"
    img = he_like(120, 120)

    def write(pixels):
        if suffix == "jpg":
            Image.fromarray(pixels).save(path, quality=95)
        else:
            tifffile.imwrite(path, pixels, photometric="rgb", tile=(64, 64))

    write(img)
    adata = _slide(path=path)
    kw = {"encoder": "resnet18", "patch_px": 16, "patch_um": 21, "copy": True}
    first = agl.pp.embed_patches(adata, **kw).obsm["X_agl_resnet18"]
    mtime = os.stat(path).st_mtime_ns
    write(255 - img)  # same path, same size (the TIFF), new pixels
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    second = agl.pp.embed_patches(adata, **kw).obsm["X_agl_resnet18"]
    assert not np.allclose(first, second)
    fresh = agl.pp.embed_patches(_slide(255 - img), **kw).obsm["X_agl_resnet18"]  # the new pixels, in memory
    if suffix == "tif":
        np.testing.assert_array_equal(second, fresh)
    else:
        np.testing.assert_allclose(second, fresh, atol=0.5)  # JPEG loss only


def test_ctrl_c_while_embedding_or_writing_leaves_the_slide_unchanged(monkeypatch):
    from agl_scverse.pp import _embed

    adata = _slide(he_like(120, 120))
    adata.obsm["X_agl_resnet18"] = np.zeros((len(XY), 2), dtype=np.float32)  # an older embedding under the key
    snap = snapshot(adata)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_embed, "normalize", stop)  # in the middle of encoding
    with pytest.raises(KeyboardInterrupt):
        agl.pp.embed_patches(adata, encoder="resnet18", patch_px=16, patch_um=21)
    assert_unchanged(adata, snap)
    monkeypatch.undo()

    class Interrupting(dict):
        def __setitem__(self, key, value):
            if key == "agl_embeddings":
                raise KeyboardInterrupt  # the last write of the block, after .obsm was replaced
            super().__setitem__(key, value)

    adata.uns = Interrupting(adata.uns)
    with pytest.raises(KeyboardInterrupt):
        agl.pp.embed_patches(adata, encoder="resnet18", patch_px=16, patch_um=21)
    assert_unchanged(adata, snap)
    assert not adata.obsm["X_agl_resnet18"].any()  # the older embedding is back
