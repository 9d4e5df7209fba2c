"""``agl-scverse predict-slide``: a bare H&E image to an .h5ad of predictions on a grid over its tissue."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from builders import FAST
from he_images import CENTRE, RADIUS, he_pixels, write_png, write_tiff

import agl_scverse as agl
from agl_scverse import cli

KW = {"n_tissue_genes": 10, "n_informative": 10, "n_noise": 20, "n_bursty_noise": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model on random-init resnet18 patches (32 px over 112 µm at 1 µm/px), fitted in seconds."""
    train = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=0, **KW)
    model = agl.tl.agl_fit(
        train, method="agl", encoder="resnet18", patch_px=32, n_targets=3, min_cells=1, backend="torch",
        **{**FAST, "epochs": 1},
    )  # fmt: skip
    path = tmp_path_factory.mktemp("slide_model") / "model"
    model.save(path)
    return path


def test_predict_slide_end_to_end(tmp_path, model_dir, capsys):
    image, out = write_tiff(tmp_path, microns_per_pixel=1.0), tmp_path / "pred.h5ad"
    argv = ["predict-slide", str(model_dir), str(image), "--out", str(out), "--backend", "torch", "--pitch-um", "60"]
    assert cli.main(argv) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    pred = ad.read_h5ad(out)
    assert summary.startswith(f"predict-slide: {pred.n_obs} hex spots (112 µm, pitch 60 µm)")
    model = agl.model.AGLModel.load(model_dir)
    assert pred.var_names.tolist() == list(model.predicted_genes)
    assert pred.n_obs > 20 and np.isfinite(np.asarray(pred.X)).all()
    xy = pred.obsm["spatial"]
    assert (np.hypot(xy[:, 0] - CENTRE[1], xy[:, 1] - CENTRE[0]) < RADIUS + 15).all()  # full-res px, on tissue
    # the same as the Python route, step by step
    grid = agl.pp.spot_grid(agl.io.read_he_image(image), pitch_um=60, model=model_dir)
    api = agl.tl.predict_anndata(grid, model_dir, backend="torch")
    np.testing.assert_allclose(np.asarray(pred.X), np.asarray(api.X), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(xy, api.obsm["spatial"])
    # in chunks (resumable): the same file
    chunked = tmp_path / "chunked.h5ad"
    argv += ["--chunk-dir", str(tmp_path / "chunks"), "--chunk-size", "16"]
    assert cli.main([*argv[:4], str(chunked), *argv[5:]]) == 0
    assert len(list((tmp_path / "chunks").glob("part_*.npy"))) == -(-pred.n_obs // 16)
    np.testing.assert_allclose(np.asarray(ad.read_h5ad(chunked).X), np.asarray(pred.X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--microns-per-pixel"),  # a PNG records no scale
        (["--microns-per-pixel", "1", "--pitch-um", "0.5"], "smaller than a pixel"),
        (["--microns-per-pixel", "1", "--num-workers", "-1"], "--num-workers"),
        (["--microns-per-pixel", "1", "--chunk-dir", "c", "--chunk-size", "0"], "--chunk-size"),
    ],
)
def test_predict_slide_errors_are_one_line_before_any_work(tmp_path, model_dir, capsys, extra, message):
    out = tmp_path / "p.h5ad"
    assert cli.main(["predict-slide", str(model_dir), str(write_png(tmp_path)), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agl-scverse: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_predict_slide_missing_image(tmp_path, model_dir, capsys):
    assert cli.main(["predict-slide", str(model_dir), str(tmp_path / "no.tif"), "--out", str(tmp_path / "p.h5ad")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _torchrun_predict_slide(tmp_path, args: list[str], out) -> None:
    """``predict-slide ARGS --out OUT`` in two gloo processes (16-spot chunks); one summary line, rank 0's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(agl.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "agl_scverse.cli",
           "predict-slide", *args, "--out", str(out), "--chunk-dir", str(tmp_path / "chunks"), "--chunk-size", "16"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (proc.stdout + proc.stderr).count("predict-slide: ") == 1  # one summary line: rank 0's
    assert not list((tmp_path / "chunks").glob(".*tmp*"))
    assert not [p.name for p in Path(out).parent.iterdir() if p.name.startswith(".")]  # no temp store left


@pytest.mark.slow
def test_predict_slide_under_torchrun_matches_one_process(tmp_path, model_dir):
    """Two gloo processes share each chunk's embedding; rank 0 writes the chunks and the file, as one process would."""
    image = write_tiff(tmp_path, microns_per_pixel=1.0)
    args = [str(model_dir), str(image), "--backend", "torch", "--pitch-um", "60", "--device", "cpu"]
    one = tmp_path / "one.h5ad"
    assert cli.main(["predict-slide", *args, "--out", str(one)]) == 0
    two = tmp_path / "two.h5ad"
    _torchrun_predict_slide(tmp_path, args, two)
    a, b = ad.read_h5ad(one), ad.read_h5ad(two)
    assert a.obs_names.equals(b.obs_names) and a.var_names.equals(b.var_names)
    np.testing.assert_allclose(np.asarray(b.X), np.asarray(a.X), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
def test_predict_slide_to_zarr_under_torchrun_matches_one_process(tmp_path, model_dir):
    """--out OUT.zarr from two gloo processes: rank 0 alone writes the store, equal to the one-process store."""
    sd = pytest.importorskip("spatialdata")
    image = write_tiff(tmp_path, microns_per_pixel=1.0)
    args = [str(model_dir), str(image), "--backend", "torch", "--pitch-um", "60", "--device", "cpu"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, two = tmp_path / "one" / "p.zarr", tmp_path / "two" / "p.zarr"
    assert cli.main(["predict-slide", *args, "--out", str(one)]) == 0
    _torchrun_predict_slide(tmp_path, args, two)
    a, b = sd.read_zarr(one), sd.read_zarr(two)
    assert set(a.images) == set(b.images) == {"he"} and set(a.shapes) == set(b.shapes) == {"he_grid"}
    assert set(a.tables) == set(b.tables) == {"table"}
    ta, tb = a.tables["table"], b.tables["table"]
    assert ta.obs_names.equals(tb.obs_names) and ta.var_names.equals(tb.var_names)
    np.testing.assert_allclose(np.asarray(tb.X), np.asarray(ta.X), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tb.obsm["spatial"], ta.obsm["spatial"])
    ga, gb = a.shapes["he_grid"], b.shapes["he_grid"]
    np.testing.assert_array_equal(np.column_stack([gb.geometry.x, gb.geometry.y]), ta.obsm["spatial"])
    np.testing.assert_array_equal(gb["radius"].to_numpy(), ga["radius"].to_numpy())
    levels_a, levels_b = _pyramid(a.images["he"]), _pyramid(b.images["he"])
    assert len(levels_a) == len(levels_b) >= 1
    for level_a, level_b in zip(levels_a, levels_b):
        np.testing.assert_array_equal(level_b, level_a)


def _pyramid(element) -> list[np.ndarray]:
    """The pixels of each level of an image element (one level, or a multiscale tree)."""
    import xarray as xr
    from spatialdata import get_pyramid_levels

    if isinstance(element, xr.DataArray):
        return [element.values]
    return [level.values for level in get_pyramid_levels(element)]


def test_predict_slide_with_tissue_at_the_image_edge(tmp_path, model_dir):
    """Tissue reaching the edges: the grid drops points whose patch is mostly outside, and the slide predicts."""
    from PIL import Image

    image, out = tmp_path / "edge.png", tmp_path / "p.h5ad"
    Image.fromarray(he_pixels()[150:450, 150:450]).save(image)  # the blob fills the whole image
    argv = ["predict-slide", str(model_dir), str(image), "--out", str(out), "--microns-per-pixel", "1"]
    assert cli.main([*argv, "--backend", "torch", "--pitch-um", "40"]) == 0
    pred = ad.read_h5ad(out)
    assert pred.n_obs > 40 and np.isfinite(np.asarray(pred.X)).all()


def test_a_slide_coarser_than_the_model_is_refused_before_any_work(tmp_path, model_dir, monkeypatch, capsys):
    """The model's patches are 112 µm in 32 px (3.5 µm/px); a 10 µm/px slide is refused before tissue detection."""
    import agl_scverse.pp._grid as grid_module

    def no_work(*args, **kwargs):
        raise AssertionError("tissue detection ran")

    image = write_png(tmp_path)
    monkeypatch.setattr(grid_module, "tissue_mask", no_work)
    slide = agl.io.read_he_image(image, microns_per_pixel=10.0)
    with pytest.raises(ValueError, match=r"10 µm/px image .* 3\.5 µm/px the model .*microns_per_pixel=.*allow_lowres"):
        agl.pp.spot_grid(slide, model=model_dir)
    out = tmp_path / "p.h5ad"
    assert cli.main(["predict-slide", str(model_dir), str(image), "--out", str(out), "--microns-per-pixel", "10"]) == 2
    err = capsys.readouterr().err
    assert "10 µm/px" in err and "3.5 µm/px" in err and "--microns-per-pixel" in err and "--allow-lowres" in err
    assert not out.exists()
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"coarser than the 3\.5 µm/px .*allow_lowres=True"):
        assert agl.pp.spot_grid(slide, model=model_dir, allow_lowres=True).n_obs > 0
    fine = agl.io.read_he_image(image, microns_per_pixel=4.0)  # within the 1.2x tolerance; finer is always fine
    assert agl.pp.spot_grid(fine, model=model_dir).n_obs > 0


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
def test_predict_slide_to_spatialdata_zarr(tmp_path, model_dir, capsys):
    """--out OUT.zarr: a SpatialData (image, grid circles, table) holding what the .h5ad holds; plotted as is."""
    sd = pytest.importorskip("spatialdata")
    image = write_tiff(tmp_path, microns_per_pixel=1.0)
    argv = ["predict-slide", str(model_dir), str(image), "--backend", "torch", "--pitch-um", "60", "--out"]
    assert cli.main([*argv, str(tmp_path / "p.h5ad")]) == 0
    assert cli.main([*argv, str(tmp_path / "p.zarr")]) == 0
    h5, sdata = ad.read_h5ad(tmp_path / "p.h5ad"), sd.read_zarr(tmp_path / "p.zarr")
    assert set(sdata.images) == {"he"} and set(sdata.shapes) == {"he_grid"} and set(sdata.tables) == {"table"}
    table = sdata.tables["table"]
    np.testing.assert_allclose(np.asarray(table.X), np.asarray(h5.X), rtol=1e-6)
    assert table.var_names.tolist() == h5.var_names.tolist()
    circles = sdata.shapes["he_grid"]
    np.testing.assert_allclose(np.column_stack([circles.geometry.x, circles.geometry.y]), h5.obsm["spatial"])
    assert table.obs["region"].unique().tolist() == ["he_grid"]
    assert cli.main([*argv, str(tmp_path / "p.zarr")]) == 2  # exists: --overwrite to replace it
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*argv, str(tmp_path / "p.zarr"), "--overwrite"]) == 0
    # the image element as input to the Python API, and the SpatialData plotted
    grid = agl.pp.spot_grid(agl.io.read_he_image(sdata), pitch_um=60, model=model_dir)
    np.testing.assert_array_equal(grid.obsm["spatial"], h5.obsm["spatial"])
    genes = list(h5.var_names[:2])
    axs = agl.pl.slide_prediction(sdata, genes, table_key="table", show=False)
    ref = agl.pl.slide_prediction(h5, genes, show=False)
    for a, b in zip(axs[:, 0], ref[:, 0]):
        np.testing.assert_allclose(a.collections[0].get_array(), b.collections[0].get_array())
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="module")
def weighted_model(tmp_path_factory):
    """A model whose resnet18 was built from a local weights file (its sha256 recorded): ``(model dir, weights)``."""
    import timm
    import torch

    folder = tmp_path_factory.mktemp("weighted_model")
    torch.manual_seed(5)
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), folder / "r18.pth")
    train = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=0, **KW)
    model = agl.tl.agl_fit(
        train,
        method="agl",
        encoder=agl.EncoderConfig("resnet18", weights=folder / "r18.pth", patch_px=32, backend="torch"),
        genes=agl.GeneConfig(n_targets=3, min_cells=1),
        network=agl.NetworkConfig(hidden=(16,)),
        training=agl.TrainingConfig(epochs=1, batch_size=32),
        progress=False,
    )
    model.save(folder / "model")
    return folder / "model", folder / "r18.pth"


def test_predict_slide_flags_reach_the_grid_and_the_encoder(tmp_path, weighted_model, capsys, monkeypatch):
    """--weights (sha256 checked), --spot-um, --pitch-um, --microns-per-pixel, --device, --num-workers: each one used."""
    model_dir, weights = weighted_model
    image = write_tiff(tmp_path, microns_per_pixel=1.0)
    base = ["predict-slide", str(model_dir), str(image), "--backend", "torch", "--device", "cpu", "--pitch-um", "60"]
    flags = ["--weights", str(weights), "--spot-um", "40"]
    assert cli.main([*base, *flags, "--out", str(tmp_path / "a.h5ad")]) == 0
    assert "(40 µm, pitch 60 µm)" in capsys.readouterr().out
    pred = ad.read_h5ad(tmp_path / "a.h5ad")
    sf = pred.uns["spatial"]["he"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(40.0) and sf["microns_per_pixel"] == pytest.approx(1.0)
    grid = agl.pp.spot_grid(agl.io.read_he_image(image), spot_um=40, pitch_um=60, model=model_dir)
    api = agl.tl.predict_anndata(grid, model_dir, encoder={"weights": weights, "backend": "torch"}, device="cpu")
    np.testing.assert_allclose(np.asarray(pred.X), np.asarray(api.X), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pred.obsm["spatial"], api.obsm["spatial"])
    # DataLoader workers cut the patches: the same predictions
    assert cli.main([*base, *flags, "--num-workers", "1", "--out", str(tmp_path / "w.h5ad")]) == 0
    np.testing.assert_allclose(np.asarray(ad.read_h5ad(tmp_path / "w.h5ad").X), np.asarray(pred.X), rtol=1e-5)
    # a given scale wins over the TIFF's: 0.5 µm/px doubles every length in pixels
    assert cli.main([*base, *flags, "--microns-per-pixel", "0.5", "--out", str(tmp_path / "h.h5ad")]) == 0
    half = ad.read_h5ad(tmp_path / "h.h5ad")
    assert half.uns["spatial"]["he"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(80.0)
    assert half.n_obs < pred.n_obs / 2
    capsys.readouterr()
    # the weights file is the one the model recorded: missing or another file is a one-line error, no output,
    # given before the image is read
    monkeypatch.setattr(agl.io, "read_he_image", lambda *a, **k: pytest.fail("image read before the weights check"))
    other = tmp_path / "other.pth"
    other.write_bytes(weights.read_bytes() + b"another file")
    for extra, message in (([], "weights"), (["--weights", str(other)], "differs")):
        out = tmp_path / "bad.h5ad"
        assert cli.main([*base, *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("agl-scverse: error: ") and message in err and "\n" not in err
        assert not out.exists()


def test_predict_slide_hashes_the_weights_file_once(tmp_path, weighted_model, monkeypatch):
    """The early --weights check, the encoder's rebuild and its record share one sha256 of the file."""
    import os

    from agl_scverse.encoders import _weights

    model_dir, weights = weighted_model
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new state of the file: not hashed yet
    real, hashed = _weights.sha256_file, []
    monkeypatch.setattr(_weights, "sha256_file", lambda p: hashed.append(p) or real(p))
    image = write_tiff(tmp_path, microns_per_pixel=1.0)
    argv = ["predict-slide", str(model_dir), str(image), "--weights", str(weights), "--backend", "torch"]
    assert cli.main([*argv, "--device", "cpu", "--pitch-um", "60", "--out", str(tmp_path / "p.h5ad")]) == 0
    assert hashed == [str(weights.resolve())]


def _blank_png(folder) -> str:
    from PIL import Image

    Image.fromarray(np.full((600, 600, 3), 240, np.uint8)).save(folder / "blank.png")
    return str(folder / "blank.png")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no scale", "--microns-per-pixel"),
        ("no tissue", "No tissue found"),
        ("pitch under a pixel", "smaller than a pixel"),
        ("coarser than the model", "3.5 µm/px"),
    ],
)
def test_predict_slide_bad_input_fails_before_any_work(tmp_path, model_dir, monkeypatch, capsys, case, message):
    """Each bad input of issue 22 is one line on stderr, exit 2, no output, and no patch was embedded."""
    import agl_scverse.pp._grid as grid_module

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(agl.tl, "predict_anndata", no_work)
    monkeypatch.setattr(agl.tl, "predict_chunked", no_work)
    if case != "no tissue":  # these are refused before tissue detection too
        monkeypatch.setattr(grid_module, "tissue_mask", no_work)
    image, extra = str(write_png(tmp_path)), ["--microns-per-pixel", "1"]
    if case == "no scale":
        extra = []
    elif case == "no tissue":
        image = _blank_png(tmp_path)
    elif case == "pitch under a pixel":
        extra += ["--pitch-um", "0.5"]
    else:
        extra = ["--microns-per-pixel", "10"]
    out = tmp_path / "p.h5ad"
    assert cli.main(["predict-slide", str(model_dir), image, "--out", str(out), "--backend", "torch", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agl-scverse: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_predict_slide_on_a_pyramid_gives_full_resolution_pixels(tmp_path, model_dir):
    """A pyramidal OME-TIFF (0.5 µm/px from its metadata): grid centres and spot size in level-0 pixels."""
    from he_images import write_ome_pyramid

    image, out = write_ome_pyramid(tmp_path, microns_per_pixel=0.5), tmp_path / "p.h5ad"
    argv = ["predict-slide", str(model_dir), str(image), "--out", str(out), "--backend", "torch"]
    assert cli.main([*argv, "--pitch-um", "30", "--spot-um", "20"]) == 0
    pred = ad.read_h5ad(out)
    assert pred.var_names.tolist() == list(agl.model.AGLModel.load(model_dir).predicted_genes)
    r = np.hypot(pred.obsm["spatial"][:, 0] - CENTRE[1], pred.obsm["spatial"][:, 1] - CENTRE[0])
    assert pred.n_obs > 20 and (r < RADIUS + 30).all() and r.max() > RADIUS / 2  # level 0, not a smaller level
    sf = pred.uns["spatial"]["he"]["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(0.5) and sf["spot_diameter_fullres"] == pytest.approx(40.0)
    xy = np.sort(np.unique(pred.obsm["spatial"][:, 0]))
    assert np.diff(xy).min() == pytest.approx(30.0)  # hex rows offset by half the 60 px pitch
