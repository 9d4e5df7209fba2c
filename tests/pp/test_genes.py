"""Gene roles, priors and the expression transform."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import agl_scverse as agl
from agl_scverse._constants import Keys
from agl_scverse.pp import expression_transform, gene_roles


def _adata(n_obs=120, n_vars=40, seed=0, lam=3.0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(lam, (n_obs, n_vars)).astype(np.float32)
    a = ad.AnnData(X, var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]))
    a.obs_names = [f"s{i}" for i in range(n_obs)]
    side = int(np.ceil(np.sqrt(n_obs)))
    a.obsm["spatial"] = np.stack([np.arange(n_obs) % side, np.arange(n_obs) // side], 1).astype(float) * 100
    return a


# --------------------------------------------------------------------------------------------------------------
# expression transform
# --------------------------------------------------------------------------------------------------------------
def test_expression_transform_matches_scanpy():
    a = _adata(30, 12)
    out = expression_transform(a.X, "log1p")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.log1p(a.X), rtol=1e-6)
    b = a.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    np.testing.assert_allclose(expression_transform(a.X, "log1p_cpm"), b.X, rtol=1e-5)
    # sparse input gives the same, and columns keep library sizes over all genes
    cols = np.array([3, 0, 7])
    np.testing.assert_allclose(expression_transform(sp.csr_matrix(a.X), "log1p_cpm", columns=cols), b.X[:, cols], 1e-5)
    np.testing.assert_array_equal(expression_transform(a.X, "none"), a.X)


def test_expression_transform_errors():
    with pytest.raises(ValueError, match="Unknown transform"):
        expression_transform(np.ones((2, 2)), "log2")
    with pytest.raises(ValueError, match="negative"):
        expression_transform(-np.ones((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        expression_transform(np.array([[np.nan, 1.0]]))
    # zero-count spots stay zero under log1p_cpm
    assert np.all(expression_transform(np.zeros((1, 3)), "log1p_cpm") == 0)


# --------------------------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------------------------
def _train_vs_all():
    """g0 is wildly variable on the test spots only; g1 is the most variable gene on the training spots.

    Every gene has mean ~3, so all share a seurat mean bin and dispersions_norm compares their variances.
    """
    rng = np.random.default_rng(1)
    a = _adata(200, 40, seed=1)
    train = np.zeros(200, dtype=bool)
    train[:100] = True
    a.X[:100, 0] = rng.poisson(3.0, 100)
    a.X[100:, 0] = np.where(rng.random(100) < 0.75, 0, 12)  # mean 3, variance 27
    a.X[:100, 1] = np.where(rng.random(100) < 0.5, 0, 6)  # mean 3, variance 9
    a.X[100:, 1] = rng.poisson(3.0, 100)
    return a, train


def test_hvg_targets_use_training_spots_only():
    a, train = _train_vs_all()
    assert gene_roles(a, n_targets=1, inplace=False).targets == ["g0"]  # all spots: leaks the test spots
    assert gene_roles(a, n_targets=1, train_mask=train, inplace=False).targets == ["g1"]
    # the same via an .obs column (bool, or "train" values)
    a.obs["is_train"] = train
    a.obs["split"] = np.where(train, "train", "test")
    assert gene_roles(a, n_targets=1, train_mask="is_train", inplace=False).targets == ["g1"]
    assert gene_roles(a, n_targets=1, train_mask="split", inplace=False).targets == ["g1"]


def test_hvg_targets_are_top_dispersions_norm():
    a = _adata(150, 40, seed=2)
    rng = np.random.default_rng(0)  # over-dispersed genes with the same mean (3) as the Poisson(3) others
    a.X[:, 5] = np.where(rng.random(150) < 0.5, 0, 6)  # variance 9
    a.X[:, 9] = np.where(rng.random(150) < 2 / 3, 0, 9)  # variance 18
    roles = gene_roles(a, n_targets=3, min_cells=0, inplace=False)
    b = a.copy()
    sc.pp.log1p(b)
    hv = sc.pp.highly_variable_genes(b, flavor="seurat", inplace=False)
    hv.index = a.var_names
    expected = hv["dispersions_norm"].sort_values(ascending=False).index[:3].tolist()
    assert roles.targets == expected
    assert roles.targets != a.var_names[:3].tolist()


def test_min_cells_filters_auxiliaries():
    a = _adata(60, 20)
    a.X[:, 3] = 0
    a.X[:5, 3] = 1  # counted in 5 spots
    roles = gene_roles(a, n_targets=2, min_cells=10, inplace=False)
    assert "g3" not in roles.auxiliaries and "g3" in roles.excluded
    assert "g3" in gene_roles(a, n_targets=2, min_cells=5, inplace=False).auxiliaries
    assert "g3" not in gene_roles(a, n_targets=2, min_cells=0.1, inplace=False).auxiliaries  # 10% of 60 = 6 spots


def test_user_lists():
    a = _adata(60, 20)
    roles = gene_roles(a, targets=["g7", "g2"], auxiliaries=["g1", "g4", "g9"], inplace=False)
    assert roles.targets == ["g7", "g2"]
    assert sorted(roles.auxiliaries) == ["g1", "g4", "g9"]
    assert len(roles.excluded) == 15
    # PGL: no auxiliaries
    assert gene_roles(a, targets=["g7"], auxiliaries=[], inplace=False).auxiliaries == []


# --------------------------------------------------------------------------------------------------------------
# writing, copy semantics
# --------------------------------------------------------------------------------------------------------------
def test_gene_roles_writes_var_and_uns():
    a = _adata(80, 30)
    assert gene_roles(a, n_targets=4, key_added="run1") is None
    k = Keys("run1")
    assert list(a.var[k.role].cat.categories) == ["target", "auxiliary", "excluded"]
    assert (a.var[k.role] == "target").sum() == 4
    aux = a.var[a.var[k.role] == "auxiliary"]
    assert sorted(aux[k.prior_rank]) == list(range(26))
    # rank follows the prior: best prior = rank 0
    by_rank = aux.sort_values(k.prior_rank)[k.prior].to_numpy()
    assert np.all(np.diff(by_rank) <= 0)
    tg = a.var[a.var[k.role] == "target"]
    assert tg[k.prior].isna().all() and (tg[k.prior_rank] == -1).all()
    assert a.uns["run1_gene_roles"]["prior"] == "hvg" and len(a.uns["run1_gene_roles"]["targets"]) == 4
    assert "run1" not in a.uns  # agl_fit owns .uns[key_added]


def test_gene_roles_copy():
    a = _adata(60, 20)
    b = gene_roles(a, n_targets=3, copy=True)
    assert "agl_role" in b.var and "agl_role" not in a.var and "agl_gene_roles" not in a.uns
    # agl.pp exposes it
    assert agl.pp.gene_roles is gene_roles


def test_normalized_rank_and_frame():
    a = _adata(60, 12)
    roles = gene_roles(a, n_targets=2, inplace=False)
    r = roles.normalized_rank
    assert r[0] == 0 and r[-1] == 1 and len(r) == 10 and np.all(np.diff(r) > 0)
    df = roles.to_frame()
    assert df.index.equals(a.var_names)
    assert df.loc[roles.auxiliaries[0], "prior_rank"] == 0


# --------------------------------------------------------------------------------------------------------------
# errors (input unchanged)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"n_targets": 50}, ValueError, "fewer than n_targets=50"),
        ({"targets": ["g1", "nope", "nada"]}, KeyError, r"'nope', 'nada'"),
        ({"targets": ["g1"], "auxiliaries": ["zz"]}, KeyError, "'zz'"),
        ({"targets": ["g0"]}, ValueError, "all-zero"),
        ({"targets": ["g1"], "auxiliaries": ["g1", "g2"]}, ValueError, "both targets and auxiliaries"),
        ({"train_mask": np.zeros(40, dtype=bool)}, ValueError, "No training spots"),
        ({"train_mask": np.ones(3, dtype=bool)}, ValueError, "one value per spot"),
        ({"train_mask": "missing_col"}, KeyError, "missing_col"),
        ({"prior": "magic"}, ValueError, "Unknown prior 'magic'"),
        ({"prior": "label"}, TypeError, "numeric"),
        ({"n_targets": 0}, ValueError, "n_targets must be"),
    ],
)
def test_errors_leave_input_unchanged(kwargs, exc, match):
    a = _adata(40, 10)
    a.X[:, 0] = 0
    a.var["label"] = "x"
    before = a.var.copy()
    with pytest.raises(exc, match=match):
        gene_roles(a, **kwargs)
    pd.testing.assert_frame_equal(a.var, before)
    assert not a.uns


@pytest.mark.parametrize(("value", "match"), [(np.nan, "NaN"), (-1.0, "negative")])
def test_bad_counts(value, match):
    a = _adata(30, 10)
    a.X[2, 3] = value
    with pytest.raises(ValueError, match=match):
        gene_roles(a, n_targets=2)
    assert "agl_role" not in a.var


# --------------------------------------------------------------------------------------------------------------
# priors
# --------------------------------------------------------------------------------------------------------------
def test_prior_coexpression_ranks_correlated_gene_first():
    rng = np.random.default_rng(3)
    a = _adata(150, 30, seed=3)
    signal = rng.poisson(6.0, 150).astype(np.float32)
    for j in range(3):  # targets share a signal
        a.X[:, j] = signal + rng.poisson(1.0, 150)
    a.X[:, 20] = signal + rng.poisson(1.0, 150)  # an auxiliary carrying the same signal
    roles = gene_roles(a, targets=["g0", "g1", "g2"], prior="coexpression", inplace=False)
    assert roles.auxiliaries[0] == "g20"
    assert roles.prior.iloc[0] > 0.5 > roles.prior.iloc[1]
    # matches numpy's correlation on log1p counts
    L = np.log1p(a.X)
    ref = np.mean([abs(np.corrcoef(L[:, 20], L[:, j])[0, 1]) for j in range(3)])
    assert roles.prior.iloc[0] == pytest.approx(ref, rel=1e-5)
    # sparse input gives the same scores
    a.X = sp.csr_matrix(a.X)
    roles_sp = gene_roles(a, targets=["g0", "g1", "g2"], prior="coexpression", inplace=False)
    np.testing.assert_allclose(roles_sp.prior.to_numpy(), roles.prior.to_numpy(), rtol=1e-5)


def test_prior_moran_smooth_above_shuffled():
    rng = np.random.default_rng(4)
    a = _adata(144, 12, seed=4)
    xy = a.obsm["spatial"] / 100
    smooth = np.round(10 * (1 + np.sin(xy[:, 0] / 3) * np.cos(xy[:, 1] / 3))).astype(np.float32)
    a.X[:, 5] = smooth
    a.X[:, 6] = rng.permutation(smooth)
    roles = gene_roles(a, n_targets=2, targets=["g0", "g1"], prior="moran", inplace=False)
    assert roles.auxiliaries[0] == "g5"
    assert roles.auxiliaries.index("g5") < roles.auxiliaries.index("g6")
    assert roles.prior["g5"] > 0.5 and abs(roles.prior["g6"]) < 0.3


def test_prior_moran_respects_slides():
    """Two slides at the same coordinates: one graph per slide, so a per-slide-smooth gene stays smooth."""
    a1, a2 = _adata(100, 8, seed=5), _adata(100, 8, seed=6)
    xy = a1.obsm["spatial"] / 100
    a1.X[:, 4] = np.round(5 + 4 * np.sin(xy[:, 0] / 2))
    a2.X[:, 4] = np.round(5 - 4 * np.sin(xy[:, 0] / 2))  # opposite pattern at the same places
    a = ad.concat({"A": a1, "B": a2}, label="library_id", index_unique="-")
    joint = gene_roles(a, targets=["g0"], prior="moran", library_key="library_id", inplace=False)
    assert joint.auxiliaries[0] == "g4" and joint.prior["g4"] > 0.5


def test_prior_var_column_and_nan_last():
    a = _adata(60, 10)
    score = np.arange(10, dtype=float)
    score[8] = np.nan
    a.var["my_score"] = score
    roles = gene_roles(a, targets=["g0"], prior="my_score", inplace=False)
    assert roles.auxiliaries == ["g9", "g7", "g6", "g5", "g4", "g3", "g2", "g1", "g8"]
    assert np.isnan(roles.prior.iloc[-1])


def test_streamed_dispersions_equal_scanpys(monkeypatch):
    """Large data stream the seurat dispersions in chunks; they agree with scanpy's on data both can handle."""
    import scipy.sparse as sp

    from agl_scverse.pp import _priors

    rng = np.random.default_rng(3)
    X = sp.csr_matrix(rng.poisson(rng.gamma(0.4, 3.0, size=300), size=(500, 300)).astype(np.float32))
    rows, cols = np.arange(0, 500, 2), np.arange(300)
    genes = pd.Index([f"g{i}" for i in cols])
    via_scanpy = _priors.hvg_dispersions(X, rows, cols, genes)
    streamed = _priors.streaming_seurat_dispersions(X, rows, cols, genes, chunk=37)
    np.testing.assert_array_equal(np.isnan(via_scanpy.to_numpy()), np.isnan(streamed.to_numpy()))
    np.testing.assert_allclose(streamed.to_numpy(), via_scanpy.to_numpy(), rtol=1e-5, atol=1e-6, equal_nan=True)
    # and the roles chosen through either path are the same
    a = ad.AnnData(X, var=pd.DataFrame(index=genes))
    direct = gene_roles(a, n_targets=20, min_cells=3, inplace=False)
    monkeypatch.setattr(_priors, "STREAM_HVG_BYTES", 0)
    forced = gene_roles(a, n_targets=20, min_cells=3, inplace=False)
    assert forced.targets == direct.targets and forced.auxiliaries[:50] == direct.auxiliaries[:50]


def test_compute_gene_roles_is_a_deprecated_alias_of_inplace_false():
    """One public function per job (issue 21): the old spelling warns, names the new one and returns the same."""
    import warnings

    import agl_scverse as agl

    a = ad.AnnData(np.random.default_rng(0).poisson(2.0, (60, 30)).astype(np.float32))
    before = a.copy()
    with pytest.warns(FutureWarning, match=r"gene_roles\(adata, \.\.\., inplace=False\)"):
        old = agl.pp.compute_gene_roles(a, 4, min_cells=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling does not warn
        new = agl.pp.gene_roles(a, n_targets=4, min_cells=1, inplace=False)
    assert (old.targets, old.auxiliaries, old.params) == (new.targets, new.auxiliaries, new.params)
    pd.testing.assert_series_equal(old.prior, new.prior)
    assert list(a.var.columns) == list(before.var.columns) and a.uns == {}  # neither wrote anything
    agl.pp.gene_roles(a, n_targets=4, min_cells=1)
    pd.testing.assert_frame_equal(
        a.var[["agl_role", "agl_prior", "agl_prior_rank"]],
        new.to_frame().set_axis(["agl_role", "agl_prior", "agl_prior_rank"], axis=1),
        check_names=False,
    )
    with pytest.raises(ValueError, match="inplace=True"):
        agl.pp.gene_roles(a, n_targets=4, inplace=False, copy=True)
    with pytest.raises(TypeError, match="key_added"):
        agl.pp.compute_gene_roles(a, n_targets=4, key_added="x")
