"""Tests of agl_scverse.io: legacy ST, Visium, HEST and SpatialData readers, on tiny fakes and the HER2+ data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from PIL import Image

import agl_scverse as agl
from agl_scverse import _constants as K
from agl_scverse import _spatial

PITCH_PX = 40.0  # fake legacy ST: 200 µm pitch -> 5 µm/px


# --- tiny fakes -----------------------------------------------------------------------------------------------
def _he_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Bright background with a darker pink/purple 'tissue' disc in the middle."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    tissue = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
    img[tissue] = (rng.normal([150, 90, 160], 10, size=(int(tissue.sum()), 3))).clip(0, 255).astype(np.uint8)
    return img


def write_legacy_section(
    folder: Path,
    n: int = 4,
    genes=("A", "B", "C"),
    img_size=(300, 320),
    offset=(100.0, 90.0),
    extra_spot: bool = True,
    extra_counts: bool = True,
    counts_values=None,
    gray: bool = False,
    image: bool = True,
    seed: int = 0,
) -> Path:
    """A legacy ST section: an n x n grid of spots with ``PITCH_PX`` spacing."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [(x, y) for y in range(1, n + 1) for x in range(1, n + 1)]
    rows = [f"{x}x{y}" for x, y in ids] + (["99x99"] if extra_counts else [])
    values = rng.poisson(3.0, size=(len(rows), len(genes))) if counts_values is None else counts_values
    counts = pd.DataFrame(values, index=rows, columns=list(genes))
    with gzip.open(folder / "counts.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    spots = pd.DataFrame(
        {
            "x": [x for x, _ in ids],
            "y": [y for _, y in ids],
            "pixel_x": [offset[0] + (x - 1) * PITCH_PX for x, _ in ids],
            "pixel_y": [offset[1] + (y - 1) * PITCH_PX for _, y in ids],
        }
    )
    if extra_spot:
        spots.loc[len(spots)] = [50, 50, 10.0, 10.0]
    spots["selected"] = 1
    spots.to_csv(folder / "spots.tsv", sep="\t", index=False)
    if image:
        h, w = img_size
        arr = _he_like(h, w, seed)
        im = Image.fromarray(arr[..., 0]) if gray else Image.fromarray(arr)
        im.save(folder / "he.jpg", quality=90)
    return folder


@pytest.fixture
def legacy_dir(tmp_path) -> Path:
    write_legacy_section(tmp_path / "S1", genes=("A", "B", "C"), seed=0)
    write_legacy_section(tmp_path / "S2", genes=("B", "C", "D"), n=3, seed=1)
    return tmp_path


# --- legacy ST ------------------------------------------------------------------------------------------------
def test_legacy_single_section_layout(legacy_dir, caplog):
    adata = agl.io.read_legacy_st(legacy_dir / "S1", hires_max_px=100)
    assert adata.n_obs == 16 and adata.n_vars == 3
    assert adata.obs_names[0] == "S1_1x1"
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert list(adata.obs["library_id"].cat.categories) == ["S1"]
    assert {"array_x", "array_y"} <= set(adata.obs)
    # spot 2x3 sits at offset + (1, 2) * pitch
    i = adata.obs_names.get_loc("S1_2x3")
    np.testing.assert_allclose(adata.obsm["spatial"][i], [100 + PITCH_PX, 90 + 2 * PITCH_PX])
    entry = adata.uns["spatial"]["S1"]
    hires = entry["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.ndim == 3 and hires.shape[2] == 3 and max(hires.shape[:2]) == 100
    sf = entry["scalefactors"]
    assert sf["tissue_hires_scalef"] == pytest.approx(100 / 320)
    # 200 µm pitch over 40 px -> 5 µm/px; 100 µm spots -> 20 px
    assert sf["microns_per_pixel"] == pytest.approx(5.0)
    assert sf["spot_diameter_fullres"] == pytest.approx(20.0)
    assert Path(entry["metadata"]["source_image_path"]).is_absolute()
    assert _spatial.microns_per_pixel(adata, "S1") == pytest.approx(5.0)
    # counts of a spot equal those in the file
    counts = pd.read_csv(legacy_dir / "S1" / "counts.tsv.gz", sep="\t", index_col=0)
    np.testing.assert_array_equal(adata[i].X.toarray().ravel(), counts.loc["2x3"].to_numpy())


def test_legacy_reports_unmatched(legacy_dir, monkeypatch):
    from agl_scverse.io import _legacy_st as legacy_st

    messages = []
    monkeypatch.setattr(legacy_st.logg, "warning", lambda msg, *a, **k: messages.append(msg))
    agl.io.read_legacy_st(legacy_dir / "S1", load_images=False)
    err = " ".join(messages)
    assert "1 spot(s) of counts.tsv.gz have no position" in err and "1 position(s) of spots.tsv have no counts" in err


def test_legacy_several_sections_outer_join(legacy_dir):
    adata = agl.io.read_legacy_st(legacy_dir, microns_per_pixel=2.0, hires_max_px=50)
    assert adata.n_obs == 16 + 9
    assert sorted(adata.var_names) == ["A", "B", "C", "D"]
    assert list(adata.obs["library_id"].cat.categories) == ["S1", "S2"]
    assert set(adata.uns["spatial"]) == {"S1", "S2"}
    s2 = (adata.obs["library_id"] == "S2").to_numpy()
    assert adata[s2, "A"].X.toarray().sum() == 0  # gene absent from S2 -> 0
    assert adata[~s2, "D"].X.toarray().sum() == 0
    assert adata.uns["spatial"]["S2"]["scalefactors"]["microns_per_pixel"] == 2.0
    # a list of folders and a selection by name give the same spots
    a2 = agl.io.read_legacy_st([legacy_dir / "S2"], load_images=False)
    a3 = agl.io.read_legacy_st(legacy_dir, sections=["S2"], library_key="slide", load_images=False)
    assert list(a2.obs_names) == list(a3.obs_names) == list(adata.obs_names[s2])
    assert "slide" in a3.obs and "hires" not in a3.uns["spatial"]["S2"]["images"]


def test_legacy_spot_pitch_parameter(legacy_dir):
    adata = agl.io.read_legacy_st(legacy_dir / "S1", spot_pitch_um=100.0, load_images=False)
    assert adata.uns["spatial"]["S1"]["scalefactors"]["microns_per_pixel"] == pytest.approx(2.5)


def test_legacy_errors(tmp_path):
    with pytest.raises(ValueError, match="available sections"):
        write_legacy_section(tmp_path / "ok")
        agl.io.read_legacy_st(tmp_path, sections=["nope"])
    with pytest.raises(FileNotFoundError, match="No image for library"):
        agl.io.read_legacy_st(write_legacy_section(tmp_path / "noimg", image=False))
    with pytest.raises(ValueError, match="outside"):
        agl.io.read_legacy_st(write_legacy_section(tmp_path / "out", offset=(250.0, 10.0)))
    with pytest.raises(ValueError, match="grayscale"):
        agl.io.read_legacy_st(write_legacy_section(tmp_path / "gray", gray=True))
    with pytest.raises(ValueError, match="Duplicate gene names"):
        agl.io.read_legacy_st(write_legacy_section(tmp_path / "dupg", genes=("A", "B", "A")))
    with pytest.raises(ValueError, match="negative"):
        vals = np.ones((17, 3))
        vals[3, 1] = -1
        agl.io.read_legacy_st(write_legacy_section(tmp_path / "neg", counts_values=vals))
    with pytest.raises(ValueError, match="NaN"):
        vals = np.ones((17, 3))
        vals[3, 1] = np.nan
        agl.io.read_legacy_st(write_legacy_section(tmp_path / "nan", counts_values=vals))
    with pytest.raises(ValueError, match="positive"):
        agl.io.read_legacy_st(tmp_path / "ok", microns_per_pixel=0.0)
    # duplicate barcodes in the counts file
    folder = write_legacy_section(tmp_path / "dupb", extra_counts=False)
    counts = pd.read_csv(folder / "counts.tsv.gz", sep="\t", index_col=0)
    counts.index = ["1x1"] + list(counts.index[1:-1]) + ["1x1"]
    with gzip.open(folder / "counts.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    with pytest.raises(ValueError, match="Duplicate spot barcodes"):
        agl.io.read_legacy_st(folder)
    # empty slide: no spot id matches
    folder = write_legacy_section(tmp_path / "empty", extra_counts=False)
    spots = pd.read_csv(folder / "spots.tsv", sep="\t")
    spots["x"] += 100
    spots.to_csv(folder / "spots.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="empty"):
        agl.io.read_legacy_st(folder)


# --- real data: HER2+ ---------------------------------------------------------------------------------------
@pytest.mark.shared
@pytest.mark.slow
def test_her2st_five_sections_on_tissue(her2st_dir):
    adata = agl.io.read_legacy_st(her2st_dir)
    assert adata.n_obs == 910
    assert list(adata.obs["library_id"].cat.categories) == ["C2", "C3", "C4", "C5", "C6"]
    assert adata.obs["library_id"].value_counts().to_dict() == {"C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}
    # ~15.7k genes per section (C2: 15,706); the outer join over the five sections holds their union
    assert 15_706 < adata.n_vars < 20_000
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    rng = np.random.default_rng(0)
    from scipy.spatial import cKDTree

    for lib in adata.obs["library_id"].cat.categories:
        sf = adata.uns["spatial"][lib]["scalefactors"]
        assert 0.65 < sf["microns_per_pixel"] < 0.8  # README: ~280 px for 200 µm
        assert max(adata.uns["spatial"][lib]["images"]["hires"].shape[:2]) == 2000
        xy = adata.obsm["spatial"][(adata.obs["library_id"] == lib).to_numpy()]
        img, scale, which = _spatial.get_image(adata, lib)
        assert which == "fullres" and scale == 1.0
        h, w = img.shape[:2]
        cand = rng.uniform([64, 64], [w - 64, h - 64], size=(400, 2))
        far = cand[cKDTree(xy).query(cand)[0] > 3 * 200 / sf["microns_per_pixel"]][:100]
        assert len(far) >= 30

        def crop_mean(p, img=img):
            x, y = np.round(p).astype(int)
            return img[y - 32 : y + 32, x - 32 : x + 32].mean()

        on_spots = np.mean([crop_mean(p) for p in xy])
        background = np.mean([crop_mean(p) for p in far])
        assert on_spots < background - 40, (lib, on_spots, background)
    _spatial._read_image_file.cache_clear()


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
    full = _he_like(800, 1000)
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
    Image.fromarray(_he_like(200, 300)).save(folder / "small.jpg")
    with pytest.raises(ValueError, match="outside"):
        agl.io.read_visium(folder, fullres_image=folder / "small.jpg")
    folder = write_visium(tmp_path / "dup", genes=("G1", "G2", "G1"))
    with pytest.raises(ValueError, match="Duplicate gene names"):
        agl.io.read_visium(folder, var_names_make_unique=False)
    assert list(agl.io.read_visium(folder).var_names) == ["G1", "G2", "G1-1"]


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
                "images": {"downscaled_fullres": _he_like(40, 100)},
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
        for name, row in zip(adata.obs_names, adata.obs[K.HEST_PATCH_INDEX]):
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
    Image.fromarray(_he_like(50, 60)).save(tmp_path / "small" / "wsi.png")
    with pytest.raises(ValueError, match="outside"):
        agl.io.read_hest(st, h5, microns_per_pixel=1.0, fullres_image=tmp_path / "small" / "wsi.png")


# --- SpatialData ----------------------------------------------------------------------------------------------
def make_sdata(
    image: bool = True,
    channels: int = 3,
    multiscale: bool = False,
    size=(60, 80),
    table_region: str = "spots",
    obs_names=("a", "b", "c"),
    X=None,
):
    """Image (c, y, x) with a 2x scale to 'global'; three circle spots in global coordinates (radius 5)."""
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    h, w = size
    rgb = _he_like(h, w).transpose(2, 0, 1)
    img = rgb if channels == 3 else rgb[:channels]
    images = {}
    if image:
        kw = {"scale_factors": [2]} if multiscale else {}
        images["he"] = Image2DModel.parse(
            img, dims=("c", "y", "x"), transformations={"global": Scale([2.0, 2.0], axes=("y", "x"))}, **kw
        )
    centres = np.array([[40.0, 30.0], [60.0, 50.0], [100.0, 80.0]])
    shapes = ShapesModel.parse(
        centres,
        geometry=0,
        radius=np.full(3, 5.0),
        index=np.array([10, 11, 12]),
        transformations={"global": Identity()},
    )
    obs = pd.DataFrame(
        {"region": pd.Categorical([table_region] * 3), "spot_id": [12, 10, 11]}, index=list(obs_names)
    )  # table rows in another order than the shapes
    X = np.array([[1, 0, 2], [0, 3, 1], [4, 1, 0]], dtype=np.float32) if X is None else X
    table = TableModel.parse(
        ad.AnnData(X, obs=obs, var=pd.DataFrame(index=["g1", "g2", "g3"])),
        region=table_region,
        region_key="region",
        instance_key="spot_id",
    )
    return SpatialData(images=images, shapes={"spots": shapes}, tables={"table": table})


def _sdata_snapshot(sdata) -> dict:
    t = sdata.tables["table"]
    return {
        "X": np.asarray(t.X).copy(),
        "obs": t.obs.copy(),
        "uns": repr(t.uns),
        "obsm": sorted(t.obsm),
        "shapes": sdata.shapes["spots"].copy(),
        "images": {k: repr(v) for k, v in sdata.images.items()},
    }


def _assert_same(sdata, snap: dict) -> None:
    t = sdata.tables["table"]
    np.testing.assert_array_equal(np.asarray(t.X), snap["X"])
    pd.testing.assert_frame_equal(t.obs, snap["obs"])
    assert repr(t.uns) == snap["uns"] and sorted(t.obsm) == snap["obsm"]
    pd.testing.assert_frame_equal(sdata.shapes["spots"], snap["shapes"])
    assert {k: repr(v) for k, v in sdata.images.items()} == snap["images"]


def test_from_spatialdata(tmp_path):
    sdata = make_sdata()
    snap = _sdata_snapshot(sdata)
    with pytest.warns(UserWarning, match="assuming 65"):
        adata = agl.io.from_spatialdata(sdata)
    _assert_same(sdata, snap)
    assert list(adata.obs_names) == ["a", "b", "c"]
    # table rows name instances 12, 10, 11 -> global (100, 80), (40, 30), (60, 50) -> image px = global / 2
    np.testing.assert_allclose(adata.obsm["spatial"], [[50, 40], [20, 15], [30, 25]])
    np.testing.assert_array_equal(adata.X.toarray(), sdata.tables["table"].X)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    entry = adata.uns["spatial"]["he"]
    sf = entry["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(5.0)  # radius 5 global = 2.5 image px
    assert sf["microns_per_pixel"] == pytest.approx(65 / 5.0)  # Space Ranger convention: 65 µm / circle diameter
    assert entry["images"]["hires"].shape == (60, 80, 3) and sf["tissue_hires_scalef"] == 1.0
    img, scale, which = _spatial.get_image(adata, "he")
    assert which == "fullres" and img.shape == (60, 80, 3)
    np.testing.assert_array_equal(img, sdata.images["he"].values.transpose(1, 2, 0))
    assert "spatialdata_attrs" not in adata.uns
    # same thing through the shared coercion helper
    from agl_scverse.io._spatialdata import as_anndata

    with pytest.warns(UserWarning):
        assert as_anndata(sdata).n_obs == 3


def test_from_spatialdata_multiscale_hires():
    sdata = make_sdata(multiscale=True, size=(120, 160))
    adata = agl.io.from_spatialdata(
        sdata,
        image_key="he",
        shapes_key="spots",
        table_key="table",
        library_id="s1",
        microns_per_pixel=0.5,
        hires_max_px=50,
        fullres_max_px=100,
    )
    entry = adata.uns["spatial"]["s1"]
    hires = entry["images"]["hires"]
    assert max(hires.shape[:2]) == 50 and "fullres" not in entry["images"]
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(50 / 160)
    assert entry["scalefactors"]["microns_per_pixel"] == 0.5


def test_from_spatialdata_errors():
    sdata = make_sdata()
    snap = _sdata_snapshot(sdata)
    with pytest.raises(KeyError, match="available tables"):
        agl.io.from_spatialdata(sdata, table_key="nope")
    with pytest.raises(KeyError, match="available images"):
        agl.io.from_spatialdata(sdata, image_key="nope")
    with pytest.raises(KeyError, match="available shapes"):
        agl.io.from_spatialdata(sdata, shapes_key="nope")
    with pytest.raises(ValueError, match="positive"):
        agl.io.from_spatialdata(sdata, microns_per_pixel=-1)
    _assert_same(sdata, snap)
    with pytest.raises(ValueError, match="No image element"):
        agl.io.from_spatialdata(make_sdata(image=False), microns_per_pixel=1.0)
    with pytest.raises(ValueError, match="grayscale"):
        agl.io.from_spatialdata(make_sdata(channels=1), microns_per_pixel=1.0)
    with pytest.raises(ValueError, match="outside"):
        agl.io.from_spatialdata(make_sdata(size=(30, 40)), microns_per_pixel=1.0)
    sdata = make_sdata(obs_names=("a", "a", "c"))
    snap = _sdata_snapshot(sdata)
    with pytest.raises(ValueError, match="Duplicate spot barcodes"):
        agl.io.from_spatialdata(sdata, microns_per_pixel=1.0)
    _assert_same(sdata, snap)
    X = np.ones((3, 3), dtype=np.float32)
    X[1, 1] = -2
    with pytest.raises(ValueError, match="negative"):
        agl.io.from_spatialdata(make_sdata(X=X), microns_per_pixel=1.0)
    # a table annotating the image (not shapes)
    with pytest.raises(ValueError, match="not shapes"):
        agl.io.from_spatialdata(make_sdata(table_region="he"), microns_per_pixel=1.0)
    with pytest.raises(TypeError, match="SpatialData"):
        agl.io.from_spatialdata(AnnData(np.ones((2, 2))))


def test_outputs_round_trip_h5ad(tmp_path, legacy_dir):
    """Reader outputs are h5ad-serialisable and keep their layout (images, scale factors, metadata)."""
    import anndata as ad

    for name, adata in (
        ("legacy", agl.io.read_legacy_st(legacy_dir / "S1", hires_max_px=100)),
        ("sdata", agl.io.from_spatialdata(make_sdata(), microns_per_pixel=0.5)),
    ):
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
        back = ad.read_h5ad(tmp_path / f"{name}.h5ad")
        lib = back.obs["library_id"].cat.categories[0]
        entry, orig = back.uns["spatial"][lib], adata.uns["spatial"][lib]
        np.testing.assert_array_equal(entry["images"]["hires"], orig["images"]["hires"])
        assert entry["scalefactors"] == pytest.approx(orig["scalefactors"])
        assert entry["metadata"] == orig["metadata"]
        np.testing.assert_allclose(back.obsm["spatial"], adata.obsm["spatial"])
