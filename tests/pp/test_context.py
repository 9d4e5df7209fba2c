"""agl.pp.spatial_context: neighbour aggregates per library, wider field of view, slide summary, recipe, predict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from builders import FAST, assert_unchanged, small_slide, snapshot

import agl_scverse as agl


def two_sections(n: int = 30, d: int = 5, seed: int = 0, same_coords: bool = False) -> AnnData:
    """Two libraries "A" and "B" of random spots (no distance ties); B may reuse A's coordinates."""
    rng = np.random.default_rng(seed)
    xy_a = rng.uniform(0, 1000, size=(n, 2))
    xy_b = xy_a.copy() if same_coords else rng.uniform(0, 1000, size=(n, 2))
    a = AnnData(
        obs=pd.DataFrame({"library_id": pd.Categorical(["A"] * n + ["B"] * n)}, index=[f"s{i}" for i in range(2 * n)])
    )
    a.obsm["spatial"] = np.concatenate([xy_a, xy_b])
    a.obsm["X_emb"] = rng.normal(size=(2 * n, d)).astype(np.float32)
    return a


def brute_neighbours(xy: np.ndarray, lib: np.ndarray, k: int) -> list[np.ndarray]:
    """The k nearest spots of the same library, by exhaustive distances."""
    out = []
    for i in range(len(xy)):
        same = np.flatnonzero(lib == lib[i])
        same = same[same != i]
        dist = np.linalg.norm(xy[same] - xy[i], axis=1)
        out.append(same[np.argsort(dist)[:k]])
    return out


def test_mean_on_a_tiny_grid_by_hand():
    # five spots on a line at x = 0, 1, 3, 6, 10: the 2 nearest of spot 0 are spots 1 and 2
    a = AnnData(obs=pd.DataFrame(index=list("abcde")))
    a.obsm["spatial"] = np.array([[0, 0], [1, 0], [3, 0], [6, 0], [10, 0]], dtype=float)
    a.obsm["X"] = np.array([[1.0], [2.0], [4.0], [8.0], [16.0]], dtype=np.float32)
    agl.pp.spatial_context(a, "X", n_neighs=2, output="blend")
    got = a.obsm["X_context"][:, 0]
    # a: {a,b,c}; b: {b,a,c}; c: {c,b,a}; d (x=6): {d,c,e}; e: {e,d,c}
    want = [(1 + 2 + 4) / 3, (2 + 1 + 4) / 3, (4 + 2 + 1) / 3, (8 + 4 + 16) / 3, (16 + 8 + 4) / 3]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(a.obsm["X"][:, 0], [1, 2, 4, 8, 16])  # own embedding untouched


def test_mean_max_std_match_brute_force_and_stay_within_libraries():
    a = two_sections()
    lib = a.obs["library_id"].to_numpy()
    X, k = a.obsm["X_emb"], 4
    nbrs = brute_neighbours(a.obsm["spatial"], lib, k)
    agl.pp.spatial_context(a, "X_emb", n_neighs=k, output="concat", aggregation=("mean", "max", "std"))
    out = a.obsm["X_emb_context"]
    d = X.shape[1]
    assert out.shape == (a.n_obs, 4 * d)
    for i, nb in enumerate(nbrs):
        hood = X[np.r_[i, nb]]
        assert set(lib[nb]) == {lib[i]}
        np.testing.assert_allclose(out[i, :d], X[i])
        np.testing.assert_allclose(out[i, d : 2 * d], hood.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[i, 2 * d : 3 * d], hood.max(0), rtol=1e-6)
        np.testing.assert_allclose(out[i, 3 * d :], hood.std(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kw", [{"n_neighs": 5}, {"radius_um": 300.0}, {"n_rings": 2, "grid_neighs": 4}, {"aggregation": "gaussian"}]
)
def test_no_neighbour_across_sections(kw):
    # both sections at the same coordinates: A's embedding 0, B's 1; any leak would mix them
    a = two_sections(same_coords=True)
    if "n_rings" in kw:  # a square grid for the ring graph
        g = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 100.0
        a.obsm["spatial"] = np.concatenate([g, g])
    a.uns["spatial"] = {lib: {"scalefactors": {"microns_per_pixel": 1.0}} for lib in "AB"}
    a.obsm["X_emb"] = np.repeat((a.obs["library_id"] == "B").to_numpy()[:, None], 3, 1).astype(np.float32)
    agl.pp.spatial_context(a, "X_emb", output="blend", **kw)
    np.testing.assert_allclose(a.obsm["X_emb_context"], a.obsm["X_emb"], atol=1e-6)  # a leak moves >= 1/(k+1)


def test_radius_uses_microns_per_pixel():
    a = AnnData(obs=pd.DataFrame(index=list("abc")))
    a.obsm["spatial"] = np.array([[0, 0], [10, 0], [100, 0]], dtype=float)
    a.obsm["X"] = np.array([[0.0], [3.0], [9.0]], dtype=np.float32)
    a.uns["spatial"] = {"s": {"scalefactors": {"microns_per_pixel": 2.0}}}
    agl.pp.spatial_context(a, "X", radius_um=30.0, output="blend")  # 15 px: a-b neighbours, c alone
    np.testing.assert_allclose(a.obsm["X_context"][:, 0], [1.5, 1.5, 9.0])


def test_blend_alpha_and_slide_summary():
    a = two_sections()
    X = a.obsm["X_emb"]
    agl.pp.spatial_context(a, "X_emb", n_neighs=3, output="blend", key_added="m")
    agl.pp.spatial_context(a, "X_emb", n_neighs=3, output="blend", alpha=0.25, key_added="b")
    np.testing.assert_allclose(a.obsm["b"], 0.25 * X + 0.75 * a.obsm["m"], rtol=1e-5, atol=1e-6)
    agl.pp.spatial_context(a, "X_emb", n_neighs=3, output="blend", slide="append", key_added="app")
    d = X.shape[1]
    for lib in "AB":
        rows = (a.obs["library_id"] == lib).to_numpy()
        np.testing.assert_allclose(
            a.obsm["app"][rows, d:], np.broadcast_to(X[rows].mean(0), (rows.sum(), d)), rtol=1e-5
        )
    agl.pp.spatial_context(a, "X_emb", n_neighs=3, output="blend", slide="subtract", key_added="sub")
    for lib in "AB":
        rows = (a.obs["library_id"] == lib).to_numpy()
        np.testing.assert_allclose(a.obsm["sub"][rows].mean(0), 0.0, atol=1e-5)


def test_key_added_copy_and_record():
    a = two_sections()
    a.uns["agl_embeddings"] = {
        "X_emb": {"encoder": "resnet18", "weights_sha256": "abc", "patch_px": 224, "patch_um": 160.0, "feature_dim": 5}
    }
    before = snapshot(a)
    b = agl.pp.spatial_context(a, "X_emb", n_neighs=3, copy=True)
    assert_unchanged(a, before)
    assert "X_emb_context" in b.obsm and "X_emb_context" not in a.obsm
    rec = b.uns["agl_embeddings"]["X_emb_context"]
    assert rec["encoder"] == "resnet18" and rec["weights_sha256"] == "abc" and rec["patch_um"] == 160.0
    assert rec["feature_dim"] == 15  # default: [x, mean, std]
    ctx = rec["context"]
    assert ctx["base_key"] == "X_emb" and ctx["graph"] == "knn" and ctx["n_neighs"] == 3
    assert ctx["output"] == "concat" and ctx["aggregation"] == "mean+std" and ctx["library_key"] == "library_id"
    assert agl.pp.spatial_context(a, "X_emb", n_neighs=3, output="blend", key_added="mine") is None
    assert a.obsm["mine"].shape == (a.n_obs, 5) and a.obsm["mine"].dtype == np.float32


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"embedding_key": "X_nope"}, KeyError, "embed_patches"),
        ({"n_neighs": 30}, ValueError, "library 'A' has 30"),
        ({"aggregation": "median"}, ValueError, "aggregation"),
        ({"output": "blend", "aggregation": ("mean", "max")}, ValueError, "concat"),
        ({"alpha": 1.5}, ValueError, "alpha"),
        ({"n_rings": 1, "radius_um": 10.0}, ValueError, "not both"),
        ({"key_added": "X_emb"}, ValueError, "new string key"),
        ({"fov_scale": 2.0}, ValueError, "patch_um"),
        ({"radius_um": 100.0}, KeyError, "uns"),
    ],
)
def test_errors_leave_adata_unchanged(kw, err, match):
    a = two_sections()
    before = snapshot(a)
    kw = {"embedding_key": "X_emb", **kw}
    with pytest.raises(err, match=match):
        agl.pp.spatial_context(a, **kw)
    assert_unchanged(a, before)


def test_missing_coordinates_and_nan():
    a = two_sections()
    del a.obsm["spatial"]
    with pytest.raises(KeyError, match="spatial"):
        agl.pp.spatial_context(a, "X_emb")
    a = two_sections()
    a.obsm["spatial"][3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        agl.pp.spatial_context(a, "X_emb", n_neighs=3)


def test_backed_anndata(tmp_path):
    a = two_sections()
    a = AnnData(np.ones((a.n_obs, 2), dtype=np.float32), obs=a.obs, obsm=dict(a.obsm))
    a.write_h5ad(tmp_path / "a.h5ad")
    ref = agl.pp.spatial_context(a, "X_emb", n_neighs=3, copy=True).obsm["X_emb_context"]
    import anndata as ad

    b = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    with pytest.raises(ValueError, match="copy=True"):
        agl.pp.spatial_context(b, "X_emb", n_neighs=3, copy=True)
    agl.pp.spatial_context(b, "X_emb", n_neighs=3)
    assert b.isbacked
    np.testing.assert_array_equal(b.obsm["X_emb_context"], ref)


def test_spatialdata_route():
    from builders import make_sdata

    sdata = make_sdata()
    table = sdata.tables["table"]
    table.obsm["X_emb"] = np.arange(9, dtype=np.float32).reshape(3, 3)
    table.uns["spatial"] = {"spots": {"scalefactors": {"microns_per_pixel": 1.0}}}
    agl.pp.spatial_context(sdata, "X_emb", n_neighs=2, output="blend")
    out = sdata.tables["table"].obsm["X_emb_context"]
    # three spots, k = 2: every spot sees all three
    np.testing.assert_allclose(out, np.broadcast_to(table.obsm["X_emb"].mean(0), (3, 3)), rtol=1e-6)
    assert "context" in sdata.tables["table"].uns["agl_embeddings"]["X_emb_context"]


def test_wider_field_of_view_reuses_embed_patches():
    a = agl.datasets.synthetic_slide(n_rows=5, n_cols=5)
    agl.pp.embed_patches(a, encoder="resnet18", patch_px=32, patch_um=100.0)
    agl.pp.spatial_context(a, "X_agl_resnet18", n_neighs=4, output="blend", fov_scale=4.0)
    fov_key = "X_agl_resnet18_fov200um"
    assert fov_key in a.obsm and a.uns["agl_embeddings"][fov_key]["patch_um"] == 200.0
    want = agl.pp.embed_patches(
        a, encoder="resnet18", patch_px=32, patch_um=200.0, on_outside="pad", copy=True, key_added="w"
    ).obsm["w"]
    np.testing.assert_allclose(a.obsm["X_agl_resnet18_context"][:, 512:], want, rtol=1e-5, atol=1e-6)
    assert a.uns["agl_embeddings"]["X_agl_resnet18_context"]["context"]["fov_patch_um"] == 200.0
    a.obsm[fov_key] = a.obsm[fov_key] + 1.0  # reused when present with a matching record
    agl.pp.spatial_context(a, "X_agl_resnet18", n_neighs=4, output="blend", fov_scale=4.0, key_added="again")
    np.testing.assert_allclose(a.obsm["again"][:, 512:], want + 1.0, rtol=1e-5, atol=1e-5)
    # a base record of an older version (no "tta") still matches the wider embedding's record
    del a.uns["agl_embeddings"]["X_agl_resnet18"]["tta"]
    agl.pp.spatial_context(a, "X_agl_resnet18", n_neighs=4, output="blend", fov_scale=4.0, key_added="old")
    np.testing.assert_array_equal(a.obsm["old"], a.obsm["again"])
    a.uns["agl_embeddings"][fov_key]["patch_px"] = 64  # another encoder setting is refused
    with pytest.raises(ValueError, match="patch_px"):
        agl.pp.spatial_context(a, "X_agl_resnet18", n_neighs=4, fov_scale=4.0, key_added="bad")


# ------------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def context_model():
    a = small_slide(n=120)
    a.obs["library_id"] = pd.Categorical(a.obs["slide"])
    agl.pp.spatial_context(a, "X_emb", n_neighs=4, output="concat")
    model = agl.tl.agl_fit(
        a, method="pgl", embedding_key="X_emb_context", n_targets=5, device="cpu", refit=False, n_seeds=1, **FAST
    )
    return a, model


def test_predict_rebuilds_context_on_a_new_slide(context_model, tmp_path):
    a, model = context_model
    model.save(tmp_path / "m")
    loaded = agl.model.AGLModel.load(tmp_path / "m")
    assert loaded.config["encoder"]["context"]["n_neighs"] == 4
    ref = agl.tl.predict_anndata(a, loaded)
    new = a.copy()
    del new.obsm["X_emb_context"]
    new.uns.pop("agl_embeddings")
    out = agl.tl.predict_anndata(new, loaded)
    np.testing.assert_allclose(out.obsm["X_emb_context"], a.obsm["X_emb_context"])
    np.testing.assert_allclose(np.asarray(out.X), np.asarray(ref.X), rtol=1e-6)
    agl.tl.agl_predict(new, loaded)
    assert "X_emb_context" in new.obsm and "agl_pred" in new.layers


def test_predict_refuses_another_recipe(context_model):
    a, model = context_model
    other = a.copy()
    agl.pp.spatial_context(other, "X_emb", n_neighs=6, output="concat")
    before = snapshot(other)
    with pytest.raises(ValueError, match="n_neighs: data 6.* vs model 4"):
        agl.tl.agl_predict(other, model)
    assert_unchanged(other, before)
    plain = a.copy()
    plain.obsm["X_emb_context"] = np.concatenate([plain.obsm["X_emb"]] * 2, axis=1)
    plain.uns["agl_embeddings"] = {"X_emb_context": {"feature_dim": 24}}
    with pytest.raises(ValueError, match="no spatial-context recipe"):
        agl.tl.predict_anndata(plain, model)


def test_cross_validate_takes_the_context_key_and_refuses_leaks():
    a = small_slide(n=120)
    a.obs["library_id"] = pd.Categorical(a.obs["slide"])
    agl.pp.spatial_context(a, "X_emb", n_neighs=4)
    df = agl.tl.cross_validate(a, group_key="slide", methods=[], embedding_key="X_emb_context", n_targets=5)
    assert set(df["fold"]) == {"A", "B"}
    agl.pp.spatial_context(a, "X_emb", n_neighs=4, key_added="leaky")
    a.uns["agl_embeddings"]["leaky"]["context"]["library_key"] = "slide_half"
    a.obs["slide_half"] = np.where(np.arange(a.n_obs) < 90, "x", "y")  # one library spans both folds
    with pytest.raises(ValueError, match="leak between folds"):
        agl.tl.cross_validate(a, group_key="slide", methods=[], embedding_key="leaky", n_targets=5)
