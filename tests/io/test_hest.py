"""agl.io.read_hest on tiny fake HEST samples (h5ad, patches h5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from builders import he_like
from PIL import Image

import agl_scverse as agl
from agl_scverse import _constants as consts


# --- HEST -----------------------------------------------------------------------------------------------------
def write_hest(
    root: Path,
    n: int = 6,
    side: int = 16,
    with_spatial: bool = True,
    dup_barcode: bool = False,
    bad_barcodes: bool = False,
    h5_attrs=None,
    uns_image: bool = False,
    X=None,
) -> tuple[Path, Path]:
    """A HEST-like sample: st/S.h5ad (n spots, the last without a patch) and patches/S.h5 (one extra patch).

    Spot i is centred at (100 + 50 i, 80) full-res px; patch i is filled with the value 10 * (i + 1).
    """
    import h5py

    (root / "st").mkdir(parents=True, exist_ok=True)
    (root / "patches").mkdir(exist_ok=True)
    barcodes = [f"BC{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    adata = AnnData(
        X=rng.poisson(2.0, size=(n, 4)).astype(np.float32) if X is None else X,
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame(index=["g1", "g2", "g3", "g4"]),
    )
    centres = np.stack([100 + 50 * np.arange(n), np.full(n, 80)], axis=1).astype(float)
    if with_spatial:
        adata.obsm["spatial"] = centres
    if uns_image:
        adata.uns["spatial"] = {
            "ST": {
                "images": {"downscaled_fullres": he_like(40, 100)},
                "scalefactors": {"tissue_downscaled_fullres_scalef": 0.25, "spot_diameter_fullres": 30.0},
            }
        }
    st = root / "st" / "S.h5ad"
    adata.write_h5ad(st)
    # patches: spots 0..n-2 (reversed order) plus an extra barcode
    order = list(range(n - 1))[::-1]
    h5_barcodes = [barcodes[i] for i in order] + ["EXTRA"]
    if dup_barcode:
        h5_barcodes[1] = h5_barcodes[0]
    if bad_barcodes:
        h5_barcodes = [f"X{b}" for b in h5_barcodes]
    foot = 20.0  # footprint in full-res px, e.g. 112 µm at 5.6 µm/px
    coords = np.vstack([centres[order] - foot / 2, [[10.0, 10.0]]])
    img = np.stack(
        [np.full((side, side, 3), 10 * (i + 1), dtype=np.uint8) for i in order] + [np.zeros((side, side, 3), np.uint8)]
    )
    h5 = root / "patches" / "S.h5"
    with h5py.File(h5, "w") as f:
        f["img"] = img
        for k, v in (h5_attrs or {}).items():
            f["img"].attrs[k] = v
        f["coords"] = coords
        f["barcode"] = np.array(h5_barcodes, dtype="S").reshape(-1, 1)
    return st, h5


def test_read_hest_with_patches(tmp_path):
    import h5py

    st, h5 = write_hest(tmp_path)
    adata = agl.io.read_hest(st, microns_per_pixel=5.6, hires_max_px=64)
    assert adata.n_obs == 5  # spot BC5 has no patch
    assert list(adata.obs["library_id"].cat.categories) == ["S"]
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    entry = adata.uns["spatial"]["S"]
    assert entry["metadata"]["patches_h5"] == str(h5.resolve())
    # each spot's patch row holds the patch of that spot
    with h5py.File(h5) as f:
        for name, row in zip(adata.obs_names, adata.obs[consts.HEST_PATCH_INDEX]):
            assert f["barcode"][row, 0].decode() == name
            assert f["img"][row][0, 0, 0] == 10 * (int(name[2:]) + 1)
    np.testing.assert_allclose(adata.obsm["spatial"][:, 1], 80.0)
    sf = entry["scalefactors"]
    assert sf["microns_per_pixel"] == 5.6 and sf["spot_diameter_fullres"] == pytest.approx(65 / 5.6)
    # the mosaic thumbnail shows patch i (value 10 (i + 1)) at spot i
    hires = entry["images"]["hires"]
    assert hires.dtype == np.uint8 and max(hires.shape[:2]) <= 64
    s = sf["tissue_hires_scalef"]
    for (x, y), name in zip(adata.obsm["spatial"], adata.obs_names):
        assert hires[round(y * s), round(x * s), 0] == 10 * (int(name[2:]) + 1)
    assert (hires == 255).any()  # background stays white


def test_read_hest_patches_feed_pp(tmp_path):
    """The patch module reads each spot's own HEST patch through hest_patch_index / patches_h5."""
    st, _ = write_hest(tmp_path)
    adata = agl.io.read_hest(st, microns_per_pixel=5.6)
    patches = agl.pp.extract_patches(adata, patch_px=16, patch_um=112, library_key="library_id")
    np.testing.assert_array_equal(patches[:, 0, 0, 0], [10 * (int(n[2:]) + 1) for n in adata.obs_names])


def test_read_hest_coordinates_and_scale_from_h5(tmp_path):
    st, h5 = write_hest(tmp_path, with_spatial=False, h5_attrs={"patch_size": 20})
    adata = agl.io.read_hest(st, h5)  # 112 µm over a 20 px source patch -> 5.6 µm/px
    assert adata.uns["spatial"]["S"]["scalefactors"]["microns_per_pixel"] == pytest.approx(5.6)
    # top-left h5 coords + half a patch = the spot centres
    expected = np.stack([100 + 50 * np.array([int(n[2:]) for n in adata.obs_names]), np.full(5, 80)], axis=1)
    np.testing.assert_allclose(adata.obsm["spatial"], expected)
    centre = agl.io.read_hest(st, h5, patch_coords="center")
    np.testing.assert_allclose(centre.obsm["spatial"], expected - 10)


def test_read_hest_uses_h5ad_image(tmp_path):
    st, h5 = write_hest(tmp_path, uns_image=True)
    with pytest.warns(UserWarning, match="assuming 65"):
        adata = agl.io.read_hest(st, h5, library_id="lib")
    entry = adata.uns["spatial"]["lib"]
    assert entry["images"]["hires"].shape == (40, 100, 3)
    assert entry["scalefactors"]["tissue_hires_scalef"] == 0.25
    assert entry["scalefactors"]["microns_per_pixel"] == pytest.approx(65 / 30)
    assert entry["metadata"]["hires_source"].startswith("h5ad")


def test_read_hest_errors(tmp_path):
    st, h5 = write_hest(tmp_path / "dup", dup_barcode=True)
    with pytest.raises(ValueError, match="Duplicate spot barcodes"):
        agl.io.read_hest(st, h5, microns_per_pixel=1.0)
    st, h5 = write_hest(tmp_path / "empty", bad_barcodes=True)
    with pytest.raises(ValueError, match="empty"):
        agl.io.read_hest(st, h5, microns_per_pixel=1.0)
    st, h5 = write_hest(tmp_path / "noscale")
    with pytest.raises(ValueError, match="pixel_size_um_estimated"):
        agl.io.read_hest(st, h5)
    st, h5 = write_hest(tmp_path / "noimg")
    h5.unlink()  # no patches file, no image in the h5ad, no whole-slide image
    with pytest.raises(FileNotFoundError, match="No image for library"):
        agl.io.read_hest(st, microns_per_pixel=1.0)
    X = np.ones((6, 4), dtype=np.float32)
    X[0, 0] = np.nan
    st, h5 = write_hest(tmp_path / "nan", X=X)
    with pytest.raises(ValueError, match="NaN"):
        agl.io.read_hest(st, h5, microns_per_pixel=1.0)
    st, h5 = write_hest(tmp_path / "small")
    Image.fromarray(he_like(50, 60)).save(tmp_path / "small" / "wsi.png")
    with pytest.raises(ValueError, match="outside"):
        agl.io.read_hest(st, h5, microns_per_pixel=1.0, fullres_image=tmp_path / "small" / "wsi.png")
