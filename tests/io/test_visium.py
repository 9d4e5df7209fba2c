"""agl.io.read_visium on a tiny fake Space Ranger folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from builders import he_like, write_visium
from PIL import Image

import agl_scverse as agl
from agl_scverse import _constants as consts
from agl_scverse import _spatial


# --- Visium ---------------------------------------------------------------------------------------------------
def test_read_visium(tmp_path):
    folder = write_visium(tmp_path / "outs")
    adata = agl.io.read_visium(folder, fullres_image=folder / "fullres.jpg")
    assert adata.n_obs == 5 and list(adata.var_names) == ["G1", "G2", "G3"]
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert list(adata.obs["library_id"].cat.categories) == ["lib_h5"]  # from the h5 attribute
    np.testing.assert_allclose(adata.obsm["spatial"][:, 0], [200, 300, 400, 500, 600])  # x = pxl_col
    np.testing.assert_allclose(adata.obsm["spatial"][:, 1], 300)
    entry = adata.uns["spatial"]["lib_h5"]
    assert entry["scalefactors"]["microns_per_pixel"] == pytest.approx(65 / 110)
    assert entry["metadata"]["source_image_path"] == str((folder / "fullres.jpg").resolve())
    assert entry["images"]["hires"].shape == (160, 200, 3)
    img, scale, which = _spatial.get_image(adata, "lib_h5")
    assert which == "fullres" and img.shape == (800, 1000, 3)
    # a given library id, old headerless positions file, no full-res image
    folder2 = write_visium(tmp_path / "outs2", positions_header=False)
    (folder2 / "spatial" / "tissue_positions.csv").rename(folder2 / "spatial" / "tissue_positions_list.csv")
    a2 = agl.io.read_visium(folder2, library_id="s1", library_key="slide", microns_per_pixel=0.3)
    assert list(a2.obs["slide"].cat.categories) == ["s1"]
    assert consts.SOURCE_IMAGE_PATH not in a2.uns["spatial"]["s1"]["metadata"]
    assert a2.uns["spatial"]["s1"]["scalefactors"]["microns_per_pixel"] == 0.3
    np.testing.assert_allclose(a2.obsm["spatial"], adata.obsm["spatial"])


def test_read_visium_errors(tmp_path):
    folder = write_visium(tmp_path / "bad_sf", scalefactors={"spot_diameter_fullres": 0})
    with pytest.raises(ValueError, match="positive"):
        agl.io.read_visium(folder)
    folder = write_visium(tmp_path / "no_sf")
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps({"tissue_hires_scalef": 0.2}))
    with pytest.raises(ValueError, match="spot_diameter_fullres"):
        agl.io.read_visium(folder)
    folder = write_visium(tmp_path / "gray", gray=True)
    with pytest.raises(ValueError, match="grayscale"):
        agl.io.read_visium(folder)
    folder = write_visium(tmp_path / "noimg")
    (folder / "spatial" / "tissue_hires_image.png").unlink()
    with pytest.raises(FileNotFoundError, match="No image"):
        agl.io.read_visium(folder)
    folder = write_visium(tmp_path / "small")
    Image.fromarray(he_like(200, 300)).save(folder / "small.jpg")
    with pytest.raises(ValueError, match="outside"):
        agl.io.read_visium(folder, fullres_image=folder / "small.jpg")
    folder = write_visium(tmp_path / "dup", genes=("G1", "G2", "G1"))
    with pytest.raises(ValueError, match="Duplicate gene names"):
        agl.io.read_visium(folder, var_names_make_unique=False)
    assert list(agl.io.read_visium(folder).var_names) == ["G1", "G2", "G1-1"]


@pytest.mark.parametrize("positions_header", [True, False])
def test_read_visium_without_counts_is_an_he_only_slide(tmp_path, positions_header):
    """A Space Ranger folder without the counts matrix reads with counts_file=None (regression, issue 20)."""
    path = write_visium(tmp_path / "outs", positions_header=positions_header)
    full = agl.io.read_visium(path, library_id="L", fullres_image=path / "fullres.jpg")
    (path / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(FileNotFoundError, match="counts_file=None"):
        agl.io.read_visium(path)
    he = agl.io.read_visium(path, counts_file=None, library_id="L", fullres_image=path / "fullres.jpg")
    assert he.n_vars == 0 and he.n_obs == full.n_obs + 1  # the in-tissue spot the counts lacked is kept
    pos = he.obs_names.get_indexer(full.obs_names)
    np.testing.assert_array_equal(he.obsm["spatial"][pos], full.obsm["spatial"])
    np.testing.assert_array_equal(he.obs["array_col"].to_numpy()[pos], full.obs["array_col"].to_numpy())
    a, b = he.uns["spatial"]["L"], full.uns["spatial"]["L"]
    assert a["scalefactors"] == b["scalefactors"]
    np.testing.assert_array_equal(np.asarray(a["images"]["hires"]), np.asarray(b["images"]["hires"]))
    assert a["metadata"][consts.SOURCE_IMAGE_PATH] == b["metadata"][consts.SOURCE_IMAGE_PATH]
