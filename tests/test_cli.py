"""The command line: parser, reader dispatch, output checks and one-line errors (the demo itself runs in CI).

Most tests call ``cli.main(argv)`` in-process (fast); one runs the console entry point in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from builders import small_slide

from agl_scverse import cli

SRC = Path(__file__).resolve().parents[1] / "src"
FIT = ["--embedding-key", "X_emb", "--epochs", "2", "--n-targets", "10"]


def test_parser_knows_every_command():
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--out", "x", "--seed", "3", "--epochs", "2"])
    assert (args.command, args.out, args.seed, args.epochs, args.patch_px) == ("demo", "x", 3, 2, 112)
    args = parser.parse_args(["fit", "data.h5ad", "--out", "m", "--method", "pgl"])
    assert (args.command, args.method, args.reader, args.n_targets) == ("fit", "pgl", "auto", 50)
    args = parser.parse_args(["predict", "m", "new.h5ad", "--out", "p.h5ad"])
    assert (args.model, args.data) == ("m", "new.h5ad")
    args = parser.parse_args(["cross-validate", "d", "--methods", "pgl", "dkgsb"])
    assert args.methods == ["pgl", "dkgsb"] and args.group_key is None  # --library-key, else library_id
    args = parser.parse_args(["benchmark", "d", "--embedding-key", "X_emb"])  # the 0.1 name still works
    assert args.embedding_key == "X_emb" and not args.overwrite
    args = parser.parse_args(["fit", "d", "--out", "m", "--method", "topk", "--k", "7", "--embedding-key", "E"])
    assert (args.k, args.embedding_key, args.debug) == (7, "E", False)
    args = parser.parse_args(["predict", "m", "d", "--out", "p.h5ad", "--embedding-key", "E", "--overwrite"])
    assert args.embedding_key == "E" and args.overwrite
    assert args.backend == "auto"  # what runs a frozen encoder when patches are embedded
    for cmd in (["predict", "m", "d", "--out", "p"], ["fit", "d", "--out", "m"], ["cross-validate", "d"]):
        assert parser.parse_args([*cmd, "--backend", "torch"]).backend == "torch"
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "m", "d", "--out", "p", "--backend", "tensorrt"])


@pytest.mark.parametrize(
    "argv", [["--debug", "predict", "m", "d", "--out", "o"], ["predict", "m", "d", "--out", "o", "--debug"]]
)
def test_debug_flag_before_or_after_the_command(argv):
    assert cli.build_parser().parse_args(argv).debug is True


def test_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["fit", "d", "--out", "m", "--method", "magic"])
    assert "invalid choice" in capsys.readouterr().err


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli._read(str(tmp_path / "nope.h5ad"))


def test_read_dispatches_h5ad(tmp_path):
    a = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    a.write_h5ad(tmp_path / "a.h5ad")
    b = cli._read(str(tmp_path / "a.h5ad"))
    assert b.shape == (3, 2)


def test_read_legacy_st_auto(her2st_dir):
    adata = cli._read(str(her2st_dir / "C2"))
    assert adata.n_obs > 150 and "library_id" in adata.obs


# --- main(argv): exit status and one-line errors ----------------------------------------------------------------
@pytest.fixture
def slide_h5ad(tmp_path) -> Path:
    path = tmp_path / "slide.h5ad"
    small_slide().write_h5ad(path)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("agl-scverse: error: "), err[0]
    return err[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--method", "topk"], "--method topk needs --k"), (["--method", "agl", "--k", "3"], "--k applies to the topk")],
)
def test_topk_and_k_go_together(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "d.h5ad", "--out", str(tmp_path / "m"), *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_fit_predict_round_trip_with_embedding_key(tmp_path, slide_h5ad, capsys):
    model, fitted, pred = tmp_path / "m", tmp_path / "fit.h5ad", tmp_path / "p.h5ad"
    argv = ["fit", str(slide_h5ad), *FIT, "--method", "topk", "--k", "5", "--out", str(model), "--h5ad", str(fitted)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    fitted_adata = ad.read_h5ad(fitted)
    run = fitted_adata.uns["agl"]
    assert run["k"] == 5
    summary = next(line for line in out if line.startswith("fit: "))  # one line of results
    assert summary.startswith("fit: AGL top-k, 10 target genes, 5 of ")
    assert f"best epoch {run['metrics']['best_epoch']}, validation PCC {run['metrics']['val_pcc']:.3f}" in summary
    assert cli.main(["predict", str(model), str(slide_h5ad), "--embedding-key", "X_emb", "--out", str(pred)]) == 0
    result = ad.read_h5ad(pred)
    assert "agl_pred" in result.layers
    line = capsys.readouterr().out.strip().splitlines()[-1]
    test = result.uns["agl"]["metrics"]["test"]
    assert line.startswith(
        f"predict: 120 spots x 15 predicted genes -> {pred}; PCC {test['model']['pearson']:.3f} over 10"
    )
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file of the atomic write is gone


def test_existing_outputs_are_refused_before_any_work(tmp_path, slide_h5ad, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the slide was read although the output check should have failed")

    monkeypatch.setattr(cli, "_read", no_work)
    (tmp_path / "m").mkdir()
    (tmp_path / "p.h5ad").write_text("old")
    (tmp_path / "cv.csv").write_text("old")
    cases = [
        (["fit", str(slide_h5ad), "--out", str(tmp_path / "m")], "--out"),
        (["fit", str(slide_h5ad), "--out", str(tmp_path / "m2"), "--h5ad", str(tmp_path / "p.h5ad")], "--h5ad"),
        (["predict", str(tmp_path / "m"), str(slide_h5ad), "--out", str(tmp_path / "p.h5ad")], "--out"),
        (["cross-validate", str(slide_h5ad), "--out", str(tmp_path / "cv.csv")], "--out"),
    ]
    for argv, flag in cases:
        assert cli.main(argv) == 2
        line = _error_line(capsys)
        assert f"{flag} " in line and "already exists; pass --overwrite" in line
    assert (tmp_path / "p.h5ad").read_text() == "old" and (tmp_path / "cv.csv").read_text() == "old"


def test_output_folder_must_exist_and_be_writable(tmp_path, slide_h5ad, capsys):
    argv = ["predict", str(tmp_path / "m"), str(slide_h5ad), "--out"]
    assert cli.main([*argv, str(tmp_path / "no_such_dir" / "p.h5ad")]) == 2
    assert "no_such_dir does not exist" in _error_line(capsys)
    assert cli.main([*argv, str(tmp_path)]) == 2
    assert "is a folder; pass a file path" in _error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert cli.main(["fit", str(slide_h5ad), "--out", str(tmp_path / "file" / "m")]) == 2
    assert "is a file, not a folder" in _error_line(capsys)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            assert cli.main([*argv, str(locked / "p.h5ad")]) == 2
            assert "cannot write in" in _error_line(capsys)
        finally:
            locked.chmod(0o700)


def test_overwrite_replaces_outputs(tmp_path, slide_h5ad, capsys):
    model, pred = tmp_path / "m", tmp_path / "p.h5ad"
    assert cli.main(["fit", str(slide_h5ad), *FIT, "--method", "pgl", "--out", str(model)]) == 0
    pred.write_text("old")
    argv = ["predict", str(model), str(slide_h5ad), "--embedding-key", "X_emb", "--out", str(pred)]
    assert cli.main(argv) == 2
    assert cli.main([*argv, "--overwrite"]) == 0
    assert ad.read_h5ad(pred).n_obs == 120
    assert cli.main(["fit", str(slide_h5ad), *FIT, "--method", "pgl", "--out", str(model), "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "{missing}", "--out", "{tmp}/m"], "does not exist"),
        (["fit", "{slide}", "--out", "{tmp}/m", "--embedding-key", "nope"], "nope"),
        (["fit", "{slide}", "--out", "{tmp}/m", *FIT[:2], "--n-targets", "-3"], "n_targets"),
        (["fit", "{slide}", "--out", "{tmp}/m", *FIT[:2], "--method", "topk", "--k", "-1"], "k"),
        (["fit", "{slide}", "--out", "{tmp}/m", *FIT, "--prior", "magic"], "prior"),
        (["fit", "{slide}", "--out", "{tmp}/m", *FIT, "--split-key", "nope", "--val-groups", "A"], "nope"),
        (["fit", "{text}", "--out", "{tmp}/m"], "not .h5ad"),
        (["fit", "{broken}", "--out", "{tmp}/m"], ""),
        (["predict", "{tmp}/no_model", "{slide}", "--out", "{tmp}/p.h5ad"], "not a saved AGL model"),
        (["cross-validate", "{slide}", "--group-key", "nope", "--out", "{tmp}/cv.csv"], "--group-key 'nope'"),
    ],
    ids=[
        "missing-data",
        "missing-embedding",
        "bad-n-targets",
        "negative-k",
        "bad-prior",
        "bad-split-key",
        "not-h5ad",
        "truncated-h5ad",
        "not-a-model",
        "bad-group-key",
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, slide_h5ad, capsys, argv, message):
    (tmp_path / "notes.txt").write_text("not a slide")
    (tmp_path / "broken.h5ad").write_bytes(slide_h5ad.read_bytes()[:2000])  # truncated
    fill = {
        "{missing}": str(tmp_path / "nope.h5ad"),
        "{slide}": str(slide_h5ad),
        "{text}": str(tmp_path / "notes.txt"),
        "{broken}": str(tmp_path / "broken.h5ad"),
    }
    argv = [fill.get(a, a.replace("{tmp}", str(tmp_path))) for a in argv]
    before = slide_h5ad.read_bytes()
    assert cli.main(argv) == 2
    assert message in _error_line(capsys)
    assert slide_h5ad.read_bytes() == before
    assert not (tmp_path / "m").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["--debug", "fit", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "m")])


def test_internal_errors_and_interrupts(tmp_path, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_read", bug)
    (tmp_path / "x.h5ad").write_text("x")  # exists: the error comes from _read
    argv = ["fit", str(tmp_path / "x.h5ad"), "--out", str(tmp_path / "m")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agl-scverse: internal error: ZeroDivisionError") and "--debug" in err[0]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_read", interrupted)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == "agl-scverse: interrupted"


def test_console_script_in_a_subprocess(tmp_path):
    """The real process (one run: importing the package takes seconds): exit status 2 and one line on stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "exists.h5ad").write_text("x")
    out = tmp_path / "exists.h5ad"
    cmd = [sys.executable, "-m", "agl_scverse.cli", "predict", "m", str(tmp_path / "nope.h5ad"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"agl-scverse: error: --out {out} already exists; pass --overwrite to replace it or choose another path."
    ]


# --- groups, resolution flags, device ----------------------------------------------------------------------------
@pytest.fixture
def three_sections(tmp_path) -> Path:
    a = small_slide(n=150)
    a.obs["section"] = np.repeat(["A", "B", "C"], 50)
    path = tmp_path / "three.h5ad"
    a.write_h5ad(path)
    return path


def test_fit_val_and_test_groups(tmp_path, three_sections, capsys):
    """--val-groups validates on a section, --test-groups holds one out of the fit and scores it."""
    fitted = tmp_path / "fit.h5ad"
    argv = ["fit", str(three_sections), *FIT, "--method", "pgl", "--out", str(tmp_path / "m"), "--h5ad", str(fitted)]
    argv += ["--split-key", "section", "--val-groups", "B", "--test-groups", "C", "--device", "cpu"]
    assert cli.main(argv) == 0
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("fit: "))
    a = ad.read_h5ad(fitted)
    split = a.obs.groupby("section", observed=True)["agl_split"].agg(lambda s: sorted(set(s)))
    assert split.to_dict() == {"A": ["train"], "B": ["val"], "C": ["unused"]}
    test = a.uns["agl"]["metrics"]["test"]
    assert test["n_spots"] == 50
    assert "(50 training / 50 validation spots)" in summary
    assert (
        f"held-out C: PCC {test['model']['pearson']:.3f} over 50 spots (PCA+Ridge {test['pca_ridge']['pearson']:.3f})"
        in summary
    )
    assert a.uns["agl"]["params"]["device"] == "cpu"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split-key", "section", "--val-groups", "Z"], "--val-groups Z: not in .obs['section']"),
        (["--split-key", "section", "--test-groups", "A", "--val-groups", "A"], "share A"),
        (["--test-groups", "A"], "--split-key 'library_id' is not an .obs column"),
        (["--microns-per-pixel", "0.5"], "--microns-per-pixel applies to slide folders"),
        (["--fullres-image", "he.tif"], "--fullres-image applies to --reader visium or hest"),
        (["--device", "tpu"], "Unknown device 'tpu'"),
    ],
)
def test_group_and_resolution_errors_are_one_line(tmp_path, three_sections, capsys, extra, message):
    argv = ["fit", str(three_sections), *FIT, "--method", "pgl", "--out", str(tmp_path / "m"), *extra]
    assert cli.main(argv) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "m").exists()


def test_split_key_needs_groups(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "d.h5ad", "--out", str(tmp_path / "m"), "--split-key", "section"])
    assert exc.value.code == 2 and "--split-key names the column" in capsys.readouterr().err


def test_resolution_flags_reach_the_reader(tmp_path, monkeypatch):
    """--microns-per-pixel and --fullres-image go to the Visium reader; legacy ST takes the µm/px only."""
    from agl_scverse import io

    seen = {}
    monkeypatch.setattr(io, "read_visium", lambda p, **kw: seen.setdefault("visium", kw))
    monkeypatch.setattr(io, "read_legacy_st", lambda p, **kw: seen.setdefault("legacy_st", kw))
    image = tmp_path / "he.tif"
    image.write_bytes(b"x")
    (tmp_path / "outs" / "spatial").mkdir(parents=True)
    cli._read(str(tmp_path / "outs"), "auto", 0.25, str(image))
    cli._read(str(tmp_path / "outs"), "legacy_st", 0.7)
    assert seen == {
        "visium": {"microns_per_pixel": 0.25, "fullres_image": str(image)},
        "legacy_st": {"microns_per_pixel": 0.7},
    }
    with pytest.raises(FileNotFoundError, match="--fullres-image"):
        cli._read(str(tmp_path / "outs"), "visium", None, str(tmp_path / "missing.tif"))


def test_allow_lowres_goes_where_it_is_accepted():
    assert not hasattr(cli, "_accepted")  # flags go into configs; no signature inspection (issue 21)
    args = cli.build_parser().parse_args(["predict", "m", "d", "--out", "p.h5ad", "--allow-lowres"])
    assert args.allow_lowres and args.device == "auto"  # one device default everywhere (issue 21)
    args = cli.build_parser().parse_args(["fit", "d", "--out", "m", "--fullres-image", "he.tif"])
    assert args.device == "auto" and args.fullres_image == "he.tif" and not args.allow_lowres
    args = cli.build_parser().parse_args(["cross-validate", "d", "--patch-um", "160", "--microns-per-pixel", "0.7"])
    assert (args.patch_um, args.patch_px, args.microns_per_pixel) == (160.0, 224, 0.7)


# --- help: quick, plain, with an example ------------------------------------------------------------------------
HEAVY = ("torch", "scanpy", "anndata", "squidpy", "spatialdata", "timm", "pandas")


def test_help_imports_no_heavy_library(tmp_path):
    """--help of the tool and of every command, a bare ``import agl_scverse`` and a missing input file load none of
    torch, scanpy, ..."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys, contextlib, io\n"
        "import agl_scverse\n"
        "from agl_scverse import cli\n"
        "for argv in ([], ['demo'], ['fit'], ['predict'], ['cross-validate'], ['benchmark']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            cli.main([*argv, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "with contextlib.redirect_stderr(io.StringIO()):\n"  # a missing input is reported before torch loads
        f"    assert cli.main(['fit', {str(tmp_path / 'no_such.h5ad')!r}, '--out', {str(tmp_path / 'm')!r}]) == 2\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"--help imported {proc.stdout.strip()}"


def test_lazy_subpackages_still_work():
    import agl_scverse as agl

    assert agl.tl.agl_fit.__name__ == "agl_fit" and callable(agl.io.read_visium)
    assert "tl" in dir(agl) and isinstance(agl.__version__, str)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        agl.nope  # noqa: B018


@pytest.mark.parametrize("command", ["", "demo", "fit", "predict", "cross-validate"])
def test_help_has_an_example_and_no_markup(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([*command.split(), "--help"])
    text = capsys.readouterr().out
    for markup in ("``", ":class:", ":func:", ":mod:", ":meth:", "%%", ".. "):
        assert markup not in text, (command, markup)
    if command:
        assert f"example:\n  agl-scverse {command}" in text


def test_fit_scale_out_flags(tmp_path, slide_h5ad, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = cli.build_parser().parse_args(["fit", "d", "--out", "m", "--mode", "finetune", "--checkpoint-every", "2"])
    assert (args.mode, args.checkpoint_every, args.resume, args.distributed) == ("finetune", 2, False, False)
    assert args.meta_scope == "auto"
    assert cli.build_parser().parse_args(["fit", "d", "--out", "m", "--meta-scope", "all"]).meta_scope == "all"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["fit", "d", "--out", "m", "--meta-scope", "head"])
    assert "invalid choice: 'head'" in capsys.readouterr().err
    assert cli.main(["fit", str(slide_h5ad), *FIT, "--out", str(tmp_path / "m"), "--distributed"]) == 2
    assert "--distributed needs torchrun" in _error_line(capsys) and not (tmp_path / "m").exists()
    argv = ["fit", str(slide_h5ad), *FIT, "--out", str(tmp_path / "m"), "--checkpoint-every", "1", "--resume"]
    assert cli.main(argv) == 0  # no checkpoint yet: trains from the first epoch, then removes its checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "slide.h5ad"]
    hyper = json.loads((tmp_path / "m" / "config.json").read_text())["hyperparameters"]
    assert hyper["meta_scope"] == "all"  # --meta-scope auto reached agl_fit: embedding mode's "all"


def test_fit_training_flags_reach_agl_fit(tmp_path, slide_h5ad, monkeypatch):
    # --refit / --no-refit and --n-seeds default to the mode's choice; precision, augment, workers pass through
    p = cli.build_parser()
    args = p.parse_args(["fit", "d", "--out", "m"])
    assert (args.refit, args.n_seeds, args.precision, args.augment, args.num_workers) == (None, None, "auto", None, 0)
    args = p.parse_args(
        ["fit", "d", "--out", "m", "--no-refit", "--precision", "fp32", "--augment", "--num-workers", "2"]
    )
    assert (args.refit, args.precision, args.augment, args.num_workers) == (False, "fp32", True, 2)
    seen = {}

    def fake_fit(adata, **kw):
        seen.update(kw)
        raise KeyboardInterrupt

    import agl_scverse.tl

    monkeypatch.setattr(agl_scverse.tl, "agl_fit", fake_fit)
    argv = ["fit", str(slide_h5ad), *FIT, "--out", str(tmp_path / "m"), "--no-refit", "--n-seeds", "2"]
    assert cli.main([*argv, "--precision", "fp32", "--no-augment", "--num-workers", "1"]) == 130
    t, enc = seen["training"], seen["encoder"]
    assert (t.refit, t.n_seeds, enc.precision, t.augment, enc.num_workers) == (False, 2, "fp32", False, 1)
    assert not {"refit", "n_seeds", "precision", "augment", "num_workers"} & set(seen)  # configs, not flat keywords


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="POSIX: fork, RLIMIT_FSIZE")
def test_predict_over_a_file_size_limit_is_one_clean_error_and_leaves_no_temporary(tmp_path, slide_h5ad, capsys):
    """HDF5 used to die of SIGSEGV (or SIGXFSZ) after the failed write, leaving its temporary .h5ad behind."""
    model = tmp_path / "m"
    assert cli.main(["fit", str(slide_h5ad), *FIT, "--out", str(model)]) == 0
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))\n"  # SIGXFSZ keeps its default: it kills
        "from agl_scverse import cli\n"
        f"sys.exit(cli.main(['predict', {str(model)!r}, {str(slide_h5ad)!r}, '--embedding-key', 'X_emb', "
        f"'--out', {str(out_dir / 'p.h5ad')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agl-scverse: error: could not write"), proc.stderr[-2000:]
    assert "ulimit -f" in lines[0]
    assert list(out_dir.iterdir()) == []  # no temporary, no partial file


# --- issue 20: the flags a new user missed, errors in the command line's words, counts that match the file --------
def test_errors_name_flags_not_python_parameters(tmp_path, slide_h5ad, capsys, monkeypatch):
    """An error of the Python API reaches the user in flags: ``Pass weights=<path>`` -> ``Pass --weights <path>``."""
    import agl_scverse.tl

    flags = cli.command_flags(cli.build_parser(), "predict")
    assert flags["weights"][0] == "--weights" and flags["embedding_key"][0] == "--embedding-key"
    msg = cli.cli_message
    assert msg("Pass weights=<path to that file> (checked).", flags) == "Pass --weights <path to that file> (checked)."
    assert msg("pass weights='/path/to/file'.", flags) == "pass --weights /path/to/file."
    assert msg("pass allow_lowres=True, or library_key='x'", flags) == "pass --allow-lowres, or --library-key x"
    assert msg("Pass embedding_key=.", flags) == "Pass --embedding-key EMBEDDING_KEY."
    # a quoted Python call, and names without a flag, stay as written
    kept = "Run agl.tl.evaluate(adata, key_added='x', weights=<p>) first; copy=True"
    assert msg(kept, flags) == kept
    assert msg("refit=False", cli.command_flags(cli.build_parser(), "fit")) == "--no-refit"

    def fail(*a, **k):
        raise ValueError("The encoder weights are not on this machine. Pass weights=<path to that file>.")

    monkeypatch.setattr(agl_scverse.tl, "agl_fit", fail)
    assert cli.main(["fit", str(slide_h5ad), *FIT, "--out", str(tmp_path / "m")]) == 2
    line = _error_line(capsys)
    assert "Pass --weights <path to that file>." in line and "weights=" not in line


def test_predict_reports_the_genes_it_wrote(tmp_path, slide_h5ad, capsys):
    """The summary counts the genes with predictions in the file (regression: one more than written)."""
    model, pred = tmp_path / "m", tmp_path / "p.h5ad"
    assert cli.main(["fit", str(slide_h5ad), *FIT, "--method", "topk", "--k", "5", "--out", str(model)]) == 0
    aux = list(json.loads((model / "config.json").read_text())["genes"][10:])
    slide = ad.read_h5ad(slide_h5ad)
    fewer = tmp_path / "fewer.h5ad"
    slide[:, slide.var_names != aux[0]].copy().write_h5ad(fewer)  # the slide lacks one selected auxiliary
    capsys.readouterr()
    assert cli.main(["predict", str(model), str(fewer), "--embedding-key", "X_emb", "--out", str(pred)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    written = int(ad.read_h5ad(pred).var["agl_predicted"].sum())
    assert written == 14 and line.startswith(f"predict: 120 spots x {written} predicted genes")


def test_sections_library_key_layer_and_head_reach_fit(tmp_path, three_sections, capsys, monkeypatch):
    import agl_scverse.tl

    a = ad.read_h5ad(three_sections)
    a.layers["raw"] = a.X.copy()
    a.write_h5ad(three_sections)
    b = cli._read(str(three_sections), sections=["A", "C"], library_key="section")
    assert b.n_obs == 100 and sorted(b.obs["section"].unique()) == ["A", "C"]
    with pytest.raises(ValueError, match="--sections Z: not in"):
        cli._read(str(three_sections), sections=["Z"], library_key="section")
    with pytest.raises(KeyError, match="--library-key"):
        cli._read(str(three_sections), sections=["A"])
    seen = {}

    def fake_fit(adata, **kw):
        seen.update(kw, n_obs=adata.n_obs)
        raise KeyboardInterrupt

    monkeypatch.setattr(agl_scverse.tl, "agl_fit", fake_fit)
    argv = ["fit", str(three_sections), *FIT, "--out", str(tmp_path / "m"), "--sections", "A", "B"]
    argv += ["--library-key", "section", "--test-groups", "B", "--layer", "raw", "--head", "hybrid"]
    assert cli.main(argv) == 130
    assert seen["n_obs"] == 100 and seen["library_key"] == "section"
    assert (seen["genes"].layer, seen["network"].head) == ("raw", "hybrid")
    assert int((~seen["spots"]).sum()) == 50  # --test-groups B: its spots, found in --library-key's column


def test_cross_validate_flags_and_no_unasked_rrr_row(tmp_path, three_sections, capsys, monkeypatch):
    """cross-validate: --n-seeds, --refit/--no-refit, --head pass through; rrr only with --baselines ... rrr."""
    import agl_scverse.tl
    from agl_scverse.tl._cross_validate import BASELINES

    assert cli.ALL_BASELINES == BASELINES
    out = tmp_path / "cv.csv"
    argv = ["cross-validate", str(three_sections), *FIT, "--library-key", "section", "--methods", "pgl"]
    argv += ["--no-refit", "--n-seeds", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    import pandas as pd

    assert set(pd.read_csv(out)["method"]) == {"pgl", "mean", "pca_ridge"}  # regression: no rrr row unasked
    assert "3 held-out section folds" in capsys.readouterr().out
    seen = {}
    monkeypatch.setattr(agl_scverse.tl, "cross_validate", lambda adata, **kw: seen.update(kw) or pd.DataFrame())
    argv = ["cross-validate", str(three_sections), *FIT, "--group-key", "section", "--refit", "--n-seeds", "3"]
    argv += ["--baselines", "rrr", "--head", "rrr", "--out", str(tmp_path / "cv2.csv")]
    cli.main(argv)
    t = seen["training"]
    assert (t.refit, t.n_seeds, seen["network"].head, seen["baselines"]) == (True, 3, "rrr", ["rrr"])
    cli.main([*argv[:-2], "--baselines", "--out", str(tmp_path / "cv3.csv")])
    assert seen["baselines"] is False and seen["group_key"] == "section"


def test_predict_an_he_only_legacy_folder(tmp_path, capsys):
    """A legacy ST folder with images and spot tables but no counts is predicted (regression, issue 20)."""
    import torch
    from builders import FAST, write_legacy_section

    import agl_scverse as agl

    torch.set_num_threads(1)
    genes = [f"G{i}" for i in range(12)]
    root = tmp_path / "st"
    for i, name in enumerate(("S1", "S2")):
        write_legacy_section(root / name, n=6, genes=genes, img_size=(400, 400), seed=i)
    adata = agl.io.read_legacy_st(root)
    agl.pp.embed_patches(adata, encoder="resnet18", patch_px=32, device="cpu")
    model = agl.tl.agl_fit(adata, method="pgl", embedding_key="X_agl_resnet18", n_targets=4, min_cells=1, **FAST)
    model.save(tmp_path / "m")
    s2 = adata[adata.obs["library_id"] == "S2"].copy()
    expected = agl.tl.predict_anndata(s2, model)
    for f in root.glob("*/counts.tsv.gz"):
        f.unlink()
    he = agl.io.read_legacy_st(root, sections=["S2"], counts_file=None)
    direct = agl.tl.predict_anndata(he, model)  # computes the embedding with the model's recorded encoder
    pos = direct.obs_names.get_indexer(expected.obs_names)
    np.testing.assert_allclose(direct.X[pos], expected.X, rtol=1e-5, atol=1e-5)
    out = tmp_path / "p.h5ad"
    capsys.readouterr()
    assert cli.main(["predict", str(tmp_path / "m"), str(root), "--sections", "S2", "--out", str(out)]) == 0
    result = ad.read_h5ad(out)
    assert result.n_obs == he.n_obs and list(result.var_names) == model.predicted_genes
    np.testing.assert_allclose(result.X, direct.X, rtol=1e-5, atol=1e-5)
    assert capsys.readouterr().out.startswith(f"predict: {he.n_obs} spots x {len(model.predicted_genes)} predicted")
