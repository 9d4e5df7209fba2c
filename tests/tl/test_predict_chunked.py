"""agl.tl.predict_chunked: chunks saved as they finish; a killed run resumes without recomputing them."""

from __future__ import annotations

import numpy as np
import pytest
from builders import FAST
from he_images import write_tiff

import agl_scverse as agl
from agl_scverse.tl import _chunked

KW = {"n_tissue_genes": 10, "n_informative": 10, "n_noise": 20, "n_bursty_noise": 2}


@pytest.fixture(scope="module")
def model():
    train = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=0, **KW)
    return agl.tl.agl_fit(
        train, method="agl", encoder="resnet18", patch_px=32, n_targets=3, min_cells=1, backend="torch",
        **{**FAST, "epochs": 1},
    )  # fmt: skip


@pytest.fixture
def grid(tmp_path):
    return agl.pp.spot_grid(agl.io.read_he_image(write_tiff(tmp_path, 1.0)), pitch_um=60)


def test_killed_run_resumes_without_recomputing(tmp_path, model, grid, monkeypatch):
    whole = agl.tl.predict_anndata(grid, model, backend="torch")
    out_dir = tmp_path / "chunks"
    real, calls, kill = _chunked.predict_core, [], [True]

    def dies_on_third(sub, *args, **kwargs):
        calls.append(sub.obs_names[0])
        if kill[0] and len(calls) == 3:
            raise RuntimeError("killed mid-run")
        return real(sub, *args, **kwargs)

    monkeypatch.setattr(_chunked, "predict_core", dies_on_third)
    n_chunks = -(-grid.n_obs // 8)
    assert n_chunks >= 4
    with pytest.raises(RuntimeError, match="killed"):
        agl.tl.predict_chunked(grid, model, out_dir, chunk_size=8, backend="torch")
    assert sorted(p.name for p in out_dir.glob("part_*.npy")) == ["part_000000.npy", "part_000001.npy"]
    assert not list(out_dir.glob(".*tmp*"))  # no half-written chunk

    calls.clear()
    kill[0] = False
    pred = agl.tl.predict_chunked(grid, model, out_dir, chunk_size=8, backend="torch")
    assert len(calls) == n_chunks - 2 and calls[0] == grid.obs_names[16]  # only the missing chunks
    np.testing.assert_allclose(pred.X, np.asarray(whole.X), rtol=1e-5, atol=1e-6)
    assert pred.var_names.equals(whole.var_names) and pred.obs_names.equals(grid.obs_names)
    np.testing.assert_array_equal(pred.obsm["spatial"], grid.obsm["spatial"])
    assert not pred.uns["agl_pred"]["observed"] and "spatial" in pred.uns

    calls.clear()
    agl.tl.predict_chunked(grid, model, out_dir, chunk_size=8, backend="torch")
    assert calls == []  # all done: nothing recomputed


def test_a_folder_of_another_run_is_refused(tmp_path, model, grid):
    out_dir = tmp_path / "chunks"
    agl.tl.predict_chunked(grid, model, out_dir, chunk_size=64, backend="torch")
    with pytest.raises(ValueError, match="chunk_size"):
        agl.tl.predict_chunked(grid, model, out_dir, chunk_size=32, backend="torch")
    with pytest.raises(ValueError, match="grid_digest"):
        agl.tl.predict_chunked(grid[:5].copy(), model, out_dir, chunk_size=64, backend="torch")
    with pytest.raises(ValueError, match="chunk_size"):
        agl.tl.predict_chunked(grid, model, tmp_path / "x", chunk_size=0)
