"""The command line: parser, reader dispatch and clear errors (the demo itself runs in CI, see .ci/run)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from agl_scverse import cli


def test_parser_knows_every_command():
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--out", "x", "--seed", "3", "--epochs", "2"])
    assert (args.command, args.out, args.seed, args.epochs, args.patch_px) == ("demo", "x", 3, 2, 112)
    args = parser.parse_args(["fit", "data.h5ad", "--out", "m", "--method", "pgl"])
    assert (args.command, args.method, args.reader, args.n_targets) == ("fit", "pgl", "auto", 50)
    args = parser.parse_args(["predict", "m", "new.h5ad", "--out", "p.h5ad"])
    assert (args.model, args.data) == ("m", "new.h5ad")
    args = parser.parse_args(["benchmark", "d", "--methods", "pgl", "dkgsb"])
    assert args.methods == ["pgl", "dkgsb"] and args.group_key == "library_id"


def test_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["fit", "d", "--out", "m", "--method", "magic"])
    assert "invalid choice" in capsys.readouterr().err


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        cli._read(str(tmp_path / "nope.h5ad"))


def test_read_dispatches_h5ad(tmp_path):
    a = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    a.write_h5ad(tmp_path / "a.h5ad")
    b = cli._read(str(tmp_path / "a.h5ad"))
    assert b.shape == (3, 2)


def test_read_legacy_st_auto(her2st_dir):
    adata = cli._read(str(her2st_dir / "C2"))
    assert adata.n_obs > 150 and "library_id" in adata.obs
