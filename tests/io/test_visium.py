"""agl.io.read_visium on a tiny fake Space Ranger folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from builders import he_like
from PIL import Image

import agl_scverse as agl
from agl_scverse import _constants as K
from agl_scverse import _spatial


# --- Visium ---------------------------------------------------------------------------------------------------
def write_visium(
    folder: Path,
    genes=("G1", "G2", "G3"),
    n: int = 5,
    scalefactors=None,
    gray: bool = False,
    positions_header: bool = True,
) -> Path:
    """A tiny Space Ranger 'outs' folder: v3 h5 counts, tissue positions, scale factors, hires/lowres PNGs."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    barcodes = [f"AAAC{i:04d}-1" for i in range(n)]
    X = sp.csr_matrix(rng.poisson(2.0, size=(n, len(genes))).astype(np.int32))
    Xc = sp.csc_matrix(X.T)  # 10x stores the features x barcodes matrix in CSC
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"lib_h5"])
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"] = Xc.data
        m["indices"] = Xc.indices.astype(np.int64)
        m["indptr"] = Xc.indptr.astype(np.int64)
        m["shape"] = np.array(Xc.shape, dtype=np.int32)
        feat = m.create_group("features")
        feat["id"] = np.array([f"ENSG{i}" for i in range(len(genes))], dtype="S")
        feat["name"] = np.array(list(genes), dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        feat["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
    spatial = folder / "spatial"
    spatial.mkdir(exist_ok=True)
    # full-res image 1000 x 800 (w x h); spots at pxl_col (x) = 200 + 100 i, pxl_row (y) = 300
    pos = pd.DataFrame(
        {
            "barcode": barcodes + ["TTTT0000-1"],
            "in_tissue": 1,
            "array_row": 0,
            "array_col": list(range(n + 1)),
            "pxl_row_in_fullres": 300,
            "pxl_col_in_fullres": [200 + 100 * i for i in range(n + 1)],
        }
    )
    pos.to_csv(spatial / "tissue_positions.csv", index=False, header=positions_header)
    sf = {"tissue_hires_scalef": 0.2, "tissue_lowres_scalef": 0.05, "spot_diameter_fullres": 110.0}
    sf.update(scalefactors or {})
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    full = he_like(800, 1000)
    for name, s in (("hires", 0.2), ("lowres", 0.05)):
        im = Image.fromarray(full).resize((int(1000 * s), int(800 * s)))
        (im.convert("L") if gray else im).save(spatial / f"tissue_{name}_image.png")
    Image.fromarray(full).save(folder / "fullres.jpg")
    return folder


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
    assert K.SOURCE_IMAGE_PATH not in a2.uns["spatial"]["s1"]["metadata"]
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
