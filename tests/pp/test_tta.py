"""Test-time augmentation of embeddings: embed_patches(tta=8) averages the 8 dihedral views of each patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import agl_scverse as agl
from agl_scverse.pp._embed import dihedral_views


def test_dihedral_views_are_the_eight_distinct_symmetries():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = dihedral_views(x, 8)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(views[0], x)
    assert len(dihedral_views(x, 4)) == 4


def _f(x: torch.Tensor) -> torch.Tensor:  # not invariant to any turn or flip
    return torch.cat([x[:, :, :2, :3].flatten(1), x.mean((2, 3))], 1)


@pytest.fixture(scope="module")
def slide():
    return agl.datasets.synthetic_slide(n_rows=4, n_cols=4)


def test_tta_is_the_mean_of_the_views_and_is_recorded(slide):
    kw = {"patch_px": 16, "patch_um": 100.0, "device": "cpu", "precision": "fp32", "copy": True, "key_added": "e"}
    got = agl.pp.embed_patches(slide, encoder=_f, tta=True, **kw)
    views = [
        agl.pp.embed_patches(slide, encoder=lambda x, k=k: _f(dihedral_views(x, 8)[k]), **kw).obsm["e"]
        for k in range(8)
    ]
    np.testing.assert_allclose(got.obsm["e"], np.mean(views, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got.obsm["e"], views[0])
    assert got.uns["agl_embeddings"]["e"]["tta"] == 8
    assert agl.pp.embed_patches(slide, encoder=_f, **kw).uns["agl_embeddings"]["e"]["tta"] == 1


@pytest.mark.parametrize("bad", [2, 3, "yes", 8.0])
def test_bad_tta_is_refused_before_any_work(slide, bad):
    with pytest.raises(ValueError, match="tta must be"):
        agl.pp.embed_patches(slide, encoder=_f, patch_px=16, patch_um=100.0, tta=bad, copy=True)
    assert "X_agl__f" not in slide.obsm


def test_predict_refuses_features_of_another_tta():
    from builders import FAST

    a = agl.datasets.synthetic_slide(n_rows=7, n_cols=7)
    kw = {"patch_px": 16, "patch_um": 100.0, "device": "cpu", "precision": "fp32", "key_added": "e"}
    agl.pp.embed_patches(a, encoder=_f, tta=8, **kw)
    model = agl.tl.agl_fit(a, method="pgl", embedding_key="e", n_targets=5, device="cpu", refit=False, n_seeds=1,
                           **FAST)  # fmt: skip
    assert model.config["encoder"]["tta"] == 8
    b = a.copy()
    agl.pp.embed_patches(b, encoder=_f, tta=False, **kw)
    with pytest.raises(ValueError, match="tta: data 1 vs model 8"):
        agl.tl.agl_predict(b, model)
