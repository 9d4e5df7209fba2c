"""The command line: parser, reader dispatch, output checks and one-line errors (the demo itself runs in CI).

Most tests call ``cli.main(argv)`` in-process (fast); one runs the console entry point in a subprocess.
"""

from __future__ import annotations

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
    assert args.methods == ["pgl", "dkgsb"] and args.group_key == "library_id"
    args = parser.parse_args(["benchmark", "d", "--embedding-key", "X_emb"])  # the 0.1 name still works
    assert args.embedding_key == "X_emb" and not args.overwrite
    args = parser.parse_args(["fit", "d", "--out", "m", "--method", "topk", "--k", "7", "--embedding-key", "E"])
    assert (args.k, args.embedding_key, args.debug) == (7, "E", False)
    args = parser.parse_args(["predict", "m", "d", "--out", "p.h5ad", "--embedding-key", "E", "--overwrite"])
    assert args.embedding_key == "E" and args.overwrite


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
    assert "trained topk: k = 5" in capsys.readouterr().out
    assert ad.read_h5ad(fitted).uns["agl"]["k"] == 5
    assert cli.main(["predict", str(model), str(slide_h5ad), "--embedding-key", "X_emb", "--out", str(pred)]) == 0
    assert "agl_pred" in ad.read_h5ad(pred).layers
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
    argv = ["fit", "x.h5ad", "--out", str(tmp_path / "m")]
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


def test_fit_scale_out_flags(tmp_path, slide_h5ad, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = cli.build_parser().parse_args(["fit", "d", "--out", "m", "--mode", "finetune", "--checkpoint-every", "2"])
    assert (args.mode, args.checkpoint_every, args.resume, args.distributed) == ("finetune", 2, False, False)
    assert cli.main(["fit", str(slide_h5ad), *FIT, "--out", str(tmp_path / "m"), "--distributed"]) == 2
    assert "--distributed needs torchrun" in _error_line(capsys) and not (tmp_path / "m").exists()
    argv = ["fit", str(slide_h5ad), *FIT, "--out", str(tmp_path / "m"), "--checkpoint-every", "1", "--resume"]
    assert cli.main(argv) == 0  # no checkpoint yet: trains from the first epoch, then removes its checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "slide.h5ad"]
