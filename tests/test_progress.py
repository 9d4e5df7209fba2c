"""Progress bars: one rule (``progress=None`` follows scanpy's verbosity) and bars that tell the truth.

Regressions of issue 20: reading, embedding and predicting had no ``progress=`` and scanpy's verbosity did not
silence them; the fit bar stopped at "22/100" without saying it stopped early; refit bars showed every auxiliary
column as ``k`` and ``val_pcc=nan``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scanpy as sc
import torch
from builders import FAST, small_slide, write_legacy_section

import agl_scverse as agl
from agl_scverse._utils import show_progress


@pytest.fixture
def verbosity():
    old = sc.settings.verbosity
    yield
    sc.settings.verbosity = old


def test_the_rule(verbosity):
    sc.settings.verbosity = "warning"  # scanpy's default: bars shown
    assert show_progress(None) and not show_progress(False)
    sc.settings.verbosity = "error"  # silenced
    assert not show_progress(None) and show_progress(True)
    sc.settings.verbosity = "hint"
    assert show_progress(None)


@pytest.mark.parametrize(
    "fn",
    [
        agl.io.read_legacy_st,
        agl.io.read_hest,
        agl.pp.embed_patches,
        agl.tl.agl_predict,
        agl.tl.predict_anndata,
        agl.tl.agl_fit,
        agl.tl.cross_validate,
    ],  # fmt: skip
    ids=lambda f: f.__name__,
)
def test_progress_parameter_defaults_to_the_rule(fn):
    import inspect

    p = inspect.signature(fn).parameters["progress"]
    assert p.default is None and "verbosity" in fn.__doc__


def _bars(err: str, desc: str) -> list[str]:
    return [s for s in re.split(r"[\r\n]", err) if desc in s]


def test_embed_and_read_bars_follow_verbosity(tmp_path, capsys, verbosity):
    torch.set_num_threads(1)
    for i, name in enumerate(("S1", "S2")):
        write_legacy_section(tmp_path / name, n=3, seed=i)
    capsys.readouterr()
    sc.settings.verbosity = "error"
    a = agl.io.read_legacy_st(tmp_path)
    agl.pp.embed_patches(a, encoder="resnet18", patch_px=32, device="cpu")
    err = capsys.readouterr().err
    assert not _bars(err, "legacy ST sections") and not _bars(err, "embedding (resnet18)")
    sc.settings.verbosity = "warning"
    a = agl.io.read_legacy_st(tmp_path)
    agl.pp.embed_patches(a, encoder="resnet18", patch_px=32, device="cpu")
    err = capsys.readouterr().err
    assert _bars(err, "legacy ST sections") and _bars(err, "embedding (resnet18)")
    agl.pp.embed_patches(a, encoder="resnet18", patch_px=32, device="cpu", progress=False)  # explicit wins
    assert not _bars(capsys.readouterr().err, "embedding")


def test_fit_bar_says_it_stopped_early_and_refit_shows_the_k_used(capsys, verbosity):
    torch.set_num_threads(1)
    sc.settings.verbosity = "warning"
    adata = small_slide()
    adata.obsm["X_emb"] = np.random.default_rng(0).permutation(adata.obsm["X_emb"])  # no signal: stops early
    kw = {**FAST, "progress": None, "epochs": 60, "patience": 2}
    model = agl.tl.agl_fit(adata, method="dkgsb", embedding_key="X_emb", n_targets=5, min_cells=1, refit=True,
                           n_seeds=1, **kw)  # fmt: skip
    err = capsys.readouterr().err
    n_epochs = len(adata.uns["agl"]["history"]["epoch"])
    assert n_epochs < 60  # early stopping happened
    best = adata.uns["agl"]["metrics"]["best_epoch"]
    fit_lines = [s for s in _bars(err, "agl_fit (dkgsb)") if "stopped early" in s]
    assert fit_lines and f"after {n_epochs} of 60 epochs" in fit_lines[-1] and f"kept epoch {best}" in fit_lines[-1]
    assert f"{n_epochs}/{n_epochs}" in fit_lines[-1]  # the bar ends full
    refit = [s for s in _bars(err, "refit") if "k=" in s]
    assert refit and all("val_pcc" not in s for s in refit)
    assert {int(re.search(r"k=(\d+)", s).group(1)) for s in refit} == {model.k}
    assert model.k < len(model.genes) - len(model.targets)  # the old bars showed every auxiliary column
    sc.settings.verbosity = "error"
    agl.tl.agl_fit(small_slide(), method="pgl", embedding_key="X_emb", n_targets=5, min_cells=1, **kw)
    assert not _bars(capsys.readouterr().err, "agl_fit")
