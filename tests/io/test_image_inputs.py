"""16-bit images in memory (``uns['spatial']`` or SpatialData) are rescaled to 8 bit like files, never clipped."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from builders import he_like, make_sdata

import agl_scverse as agl
from agl_scverse import _spatial
from agl_scverse._images import ArraySource, LazyArraySource, to_uint8_rgb

XY = np.array([[40.0, 40.0], [80.0, 70.0]])


def _slide(img, which):
    sf = {"microns_per_pixel": 1.0, "tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 1.0}
    return ad.AnnData(
        np.ones((2, 2), dtype=np.float32),
        obs=pd.DataFrame(index=["a", "b"]),
        obsm={"spatial": XY.copy()},
        uns={"spatial": {"lib": {"images": {which: img}, "scalefactors": sf}}},
    )


def _patches(adata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # hires / lowres fallback
        ds = agl.pp.SpotPatches(adata, patch_px=16, patch_um=21)
        return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("which", ["fullres", "hires", "lowres"])
def test_in_memory_uint16_images_give_the_8_bit_patches(which):
    img = he_like(120, 120)
    deep = img.astype(np.uint16) * 257  # 16-bit: up to 65535
    for got, ref in zip(_patches(_slide(deep, which)), _patches(_slide(img, which))):
        assert not torch.all(got == 255)  # not clipped to white
        assert torch.equal(got, ref)


def test_one_rule_for_16_bit_pixels_in_every_source():
    raw = np.array([[[0, 128, 129], [32896, 65407, 65535]]], dtype=np.uint16)
    expected = ((raw.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257)
    np.testing.assert_array_equal(to_uint8_rgb(raw), expected)
    np.testing.assert_array_equal(_spatial.as_rgb(raw), expected)
    np.testing.assert_array_equal(ArraySource(raw).read_region(0, 0, 2, 1), expected)
    np.testing.assert_array_equal(LazyArraySource([raw]).read_region(0, 0, 2, 1), expected)


def test_spatialdata_uint16_image_is_rescaled_not_clipped():
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    sdata = make_sdata()
    rgb = np.asarray(sdata.images["he"].values)
    sdata.images["he"] = Image2DModel.parse(
        rgb.astype(np.uint16) * 257,
        dims=("c", "y", "x"),
        transformations={"global": Scale([2.0, 2.0], axes=("y", "x"))},
    )
    adata = agl.io.from_spatialdata(sdata, microns_per_pixel=1.0)
    entry = adata.uns["spatial"]["he"]
    np.testing.assert_array_equal(entry["images"]["hires"], rgb.transpose(1, 2, 0))  # the thumbnail
    src, _, which = _spatial.get_image(adata, "he")
    assert which == "fullres"
    np.testing.assert_array_equal(np.asarray(src), rgb.transpose(1, 2, 0))  # patches read these pixels
