"""Tests of the built-in synthetic slide."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

import agl_scverse as agl
from agl_scverse import _constants as consts
from agl_scverse._spatial import get_image, microns_per_pixel
from agl_scverse.datasets._synthetic import TISSUE_TYPES

SMALL = {"n_rows": 6, "n_cols": 5, "n_tissue_genes": 10, "n_informative": 20, "n_noise": 40, "n_bursty_noise": 5}


@pytest.fixture(scope="module")
def default_slide():
    return agl.datasets.synthetic_slide(seed=0)


@pytest.fixture(scope="module")
def small_slide():
    return agl.datasets.synthetic_slide(seed=3, **SMALL)


def test_determinism():
    a = agl.datasets.synthetic_slide(seed=1, **SMALL)
    b = agl.datasets.synthetic_slide(seed=1, **SMALL)
    c = agl.datasets.synthetic_slide(seed=2, **SMALL)
    img = lambda ad: ad.uns["spatial"]["synthetic"]["images"]["fullres"]  # noqa: E731
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(img(a), img(b))
    np.testing.assert_array_equal(a.obsm["synthetic_latent"], b.obsm["synthetic_latent"])
    assert (a.X != c.X).nnz > 0
    assert not np.array_equal(img(a), img(c))


def test_layout_and_dtypes(small_slide):
    ad = small_slide
    assert ad.shape == (30, 10 + 20 + 40)
    assert sparse.issparse(ad.X) and ad.X.format == "csr" and ad.X.dtype == np.float32
    x = ad.X.toarray()
    assert (x >= 0).all() and np.array_equal(x, np.round(x))
    assert ad.obsm["spatial"].shape == (30, 2)
    assert ad.obs[consts.LIBRARY_KEY].dtype == "category"
    assert list(ad.obs[consts.LIBRARY_KEY].cat.categories) == ["synthetic"]
    entry = ad.uns["spatial"]["synthetic"]
    full, hires = entry["images"]["fullres"], entry["images"]["hires"]
    assert full.dtype == np.uint8 and full.ndim == 3 and full.shape[2] == 3
    sf = entry["scalefactors"]
    assert sf[consts.MICRONS_PER_PIXEL] == 1.0
    assert sf[consts.SPOT_DIAMETER] == pytest.approx(100.0)
    assert hires.shape[0] == round(full.shape[0] * sf[consts.HIRES_SCALEF])
    assert hires.shape[1] == round(full.shape[1] * sf[consts.HIRES_SCALEF])
    assert entry["metadata"] == {}
    img, scale, which = get_image(ad, "synthetic")
    assert which == "fullres" and scale == 1.0 and np.array_equal(img, full)
    assert microns_per_pixel(ad, "synthetic") == 1.0
    # spots on a 100 µm grid, patches of 112 µm fit inside the image
    xy = ad.obsm["spatial"]
    assert np.allclose(np.diff(np.unique(xy[:, 0])), 100.0)
    assert np.allclose(np.diff(np.unique(xy[:, 1])), 100.0)
    h, w = full.shape[:2]
    assert (xy[:, 0] - 56 >= 0).all() and (xy[:, 0] + 56 <= w).all()
    assert (xy[:, 1] - 56 >= 0).all() and (xy[:, 1] + 56 <= h).all()
    assert ad.obsm["synthetic_latent"].shape == (30, len(ad.uns["synthetic"]["latent_names"]))


def test_ground_truth_columns(small_slide):
    var = small_slide.var
    assert var["synthetic_kind"].value_counts().to_dict() == {"tissue": 10, "informative": 20, "noise": 40}
    assert var["informative"].sum() == 20
    assert (var.loc[var["informative"], "synthetic_kind"] == "informative").all()
    assert var["bursty"].sum() == 5 and (var.loc[var["bursty"], "synthetic_kind"] == "noise").all()
    assert set(small_slide.obs["tissue_type"].cat.categories) == set(TISSUE_TYPES)
    lat = small_slide.obsm["synthetic_latent"]
    np.testing.assert_allclose(lat[:, :5].sum(1), 1.0, atol=1e-4)  # tissue composition sums to one


def test_microns_per_pixel_scales_image():
    ad = agl.datasets.synthetic_slide(seed=0, microns_per_pixel=2.0, **SMALL)
    ref = agl.datasets.synthetic_slide(seed=0, **SMALL)
    sf = ad.uns["spatial"]["synthetic"]["scalefactors"]
    assert sf[consts.MICRONS_PER_PIXEL] == 2.0 and sf[consts.SPOT_DIAMETER] == pytest.approx(50.0)
    assert np.allclose(np.diff(np.unique(ad.obsm["spatial"][:, 0])), 50.0)
    assert (
        ad.uns["spatial"]["synthetic"]["images"]["fullres"].shape[0]
        < ref.uns["spatial"]["synthetic"]["images"]["fullres"].shape[0]
    )


def test_several_slides():
    ad = agl.datasets.synthetic_slide(seed=0, n_slides=2, **SMALL)
    assert ad.n_obs == 60
    assert list(ad.obs[consts.LIBRARY_KEY].cat.categories) == ["synthetic_0", "synthetic_1"]
    assert set(ad.uns["spatial"]) == {"synthetic_0", "synthetic_1"}
    im0 = get_image(ad, "synthetic_0")[0]
    im1 = get_image(ad, "synthetic_1")[0]
    assert im0.shape == im1.shape and not np.array_equal(im0, im1)
    assert ad.obs_names.is_unique


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_rows": 0}, "n_rows"),
        ({"n_bursty_noise": 50}, "n_bursty_noise"),
        ({"n_types": 7}, "n_types"),
        ({"depth": -1.0}, "depth"),
        ({"informative_mean": (2.0, 1.0)}, "informative_mean"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        agl.datasets.synthetic_slide(**args)


def test_image_differs_between_tissue_types(default_slide):
    ad = default_slide
    img = np.asarray(get_image(ad, "synthetic")[0]).astype(np.float32)
    xy = ad.obsm["spatial"].astype(int)
    patch_mean = np.array([img[y - 50 : y + 50, x - 50 : x + 50].reshape(-1, 3).mean(0) for x, y in xy])
    types = ad.obs["tissue_type"].to_numpy()
    means = {t: patch_mean[types == t].mean(0) for t in np.unique(types)}
    assert len(means) >= 4
    names = list(means)
    dists = [np.abs(means[a] - means[b]).max() for i, a in enumerate(names) for b in names[i + 1 :]]
    assert min(dists) > 5.0, means  # every pair of tissue types differs clearly in some channel


def test_counts_depend_on_latent(default_slide):
    ad = default_slide
    x = np.log1p(ad.X.toarray())
    lat = ad.obsm["synthetic_latent"]
    kind = ad.var["synthetic_kind"].to_numpy()

    def best_r2(cols):
        # fraction of variance explained by a linear fit on the latent state, per gene
        a = np.c_[lat, np.ones(len(lat))]
        coef, *_ = np.linalg.lstsq(a, x[:, cols], rcond=None)
        res = x[:, cols] - a @ coef
        return 1 - res.var(0) / x[:, cols].var(0)

    r2_t = np.median(best_r2(kind == "tissue"))
    r2_i = np.median(best_r2(kind == "informative"))
    r2_n = np.median(best_r2(kind == "noise"))
    assert r2_t > 0.5 and r2_i > 2 * r2_n and r2_t > r2_i


def test_hvg_structure(default_slide):
    ad = default_slide.copy()
    sc.pp.log1p(ad)
    sc.pp.highly_variable_genes(ad, flavor="seurat", n_top_genes=50)
    var = ad.var
    top = var[var["highly_variable"]]
    assert (top["synthetic_kind"] == "tissue").sum() >= 30  # mostly tissue genes
    rest = var[~var["highly_variable"]].sort_values("dispersions_norm", ascending=False)
    head = rest.iloc[: int(0.2 * len(rest))]
    base_rate = rest["informative"].mean()
    assert head["informative"].mean() > 3 * base_rate
    assert head["bursty"].sum() >= 10  # harmful auxiliaries a dispersion prior cannot tell apart
    # plain (non-bursty) noise genes rank low
    plain = rest[(rest["synthetic_kind"] == "noise") & ~rest["bursty"]]
    assert plain["dispersions_norm"].median() < rest.loc[rest["informative"], "dispersions_norm"].median()
