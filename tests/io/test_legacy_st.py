"""agl.io.read_legacy_st on tiny fake sections and on the five HER2+ sections; h5ad round trips."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from builders import PITCH_PX, make_sdata, write_legacy_section

import agl_scverse as agl
from agl_scverse import _spatial


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


def test_legacy_sections_without_counts_read_as_he_only(legacy_dir):
    """A folder with an image and a spot table but no counts reads as an H&E-only slide (0 genes).

    Regression (issue 20): counts_file=None raised TypeError, and the error did not say how to read such folders.
    """
    with_counts = agl.io.read_legacy_st(legacy_dir, load_images=True, hires_max_px=100)
    for f in legacy_dir.glob("*/counts.tsv.gz"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="counts_file=None"):
        agl.io.read_legacy_st(legacy_dir)
    he = agl.io.read_legacy_st(legacy_dir, counts_file=None, hires_max_px=100)
    assert he.n_vars == 0 and he.X.shape == (he.n_obs, 0)
    # every spot of the spots files (also those the counts lacked), at the same positions, with the same images
    assert set(with_counts.obs_names) < set(he.obs_names)
    pos = he.obs_names.get_indexer(with_counts.obs_names)
    np.testing.assert_array_equal(he.obsm["spatial"][pos], with_counts.obsm["spatial"])
    assert list(he.obs["library_id"].cat.categories) == ["S1", "S2"]
    for lib in ("S1", "S2"):
        a, b = he.uns["spatial"][lib], with_counts.uns["spatial"][lib]
        np.testing.assert_array_equal(a["images"]["hires"], b["images"]["hires"])
        assert a["scalefactors"] == b["scalefactors"]
    assert agl.io.read_legacy_st(legacy_dir / "S2", counts_file=None).n_obs == 9 + 1  # 3 x 3 grid + extra spot
    with pytest.raises(FileNotFoundError, match="counts_file=None"):
        agl.io.read_legacy_st(legacy_dir / "S2")
