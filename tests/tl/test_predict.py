"""agl_predict: the prediction layer, H&E-only slides, and checks that refuse mismatched data unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import FAST, assert_unchanged, small_slide, snapshot

import agl_scverse as agl


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    adata = small_slide()
    model = agl.tl.agl_fit(adata, method="topk", k=4, embedding_key="X_emb", n_targets=5, min_cells=1, **FAST)
    return adata, model


def test_predict_writes_layer_with_zeros_and_a_var_mask(fitted):
    train, model = fitted
    new = small_slide(seed=1)
    assert agl.tl.agl_predict(new, model) is None
    P = new.layers["agl_pred"]
    assert P.shape == new.shape and P.dtype == np.float32
    pred_cols = new.var_names.isin(model.predicted_genes)
    assert pred_cols.sum() == 9
    assert np.isfinite(P).all() and (P[:, ~pred_cols] == 0).all()  # no NaN anywhere: scanpy/squidpy accept it
    np.testing.assert_array_equal(new.var["agl_predicted"].to_numpy(), pred_cols)
    rec = new.uns["agl_pred"]
    assert (rec["scale"], rec["transform"], rec["observed"], rec["n_genes"]) == ("model", "log1p", True, 9)
    direct = model.predict(new.obsm["X_emb"])
    idx = [model.genes.index(g) for g in new.var_names[pred_cols]]
    np.testing.assert_array_equal(P[:, pred_cols], direct[:, idx])
    out = agl.tl.agl_predict(new, model, key_added="run2", copy=True)
    assert "run2_pred" in out.layers and "run2_pred" not in new.layers
    assert "run2_predicted" in out.var and "run2_pred" in out.uns and "run2_predicted" not in new.var


def test_scanpy_and_squidpy_run_on_the_layer_with_the_mask(fitted):
    import scanpy as sc
    import squidpy as sq

    _, model = fitted
    new = small_slide(seed=1)
    agl.tl.agl_predict(new, model)
    mask = new.var["agl_predicted"].to_numpy()
    sc.pp.pca(new, n_comps=5, layer="agl_pred", mask_var="agl_predicted", svd_solver="full")
    alone = sc.AnnData(new.layers["agl_pred"][:, mask])
    sc.pp.pca(alone, n_comps=5, svd_solver="full")  # the masked PCA is the PCA of the predicted genes alone
    np.testing.assert_allclose(np.abs(new.obsm["X_pca"]), np.abs(alone.obsm["X_pca"]), rtol=1e-4, atol=1e-4)
    sq.gr.spatial_neighbors(new, coord_type="generic", n_neighs=6)
    sq.gr.spatial_autocorr(new, mode="moran", layer="agl_pred", genes=new.var_names[mask], n_perms=None)
    moran = new.uns["moranI"]
    assert len(moran) == mask.sum() and np.isfinite(moran["pval_norm_fdr_bh"]).all()


def test_scale_log1p_cp10k_is_scanpys_normalised_scale(fitted):
    import dask.array as da

    _, model = fitted
    raw, norm, lazy = (small_slide(seed=1) for _ in range(3))
    agl.tl.agl_predict(raw, model)
    agl.tl.agl_predict(norm, model, scale="log1p_cp10k")
    agl.tl.agl_predict(lazy, model, scale="log1p_cp10k", max_dense_bytes=0)
    assert norm.uns["agl_pred"]["scale"] == "log1p_cp10k" and isinstance(lazy.layers["agl_pred"], da.Array)
    m = raw.var["agl_predicted"].to_numpy()
    counts = np.expm1(raw.layers["agl_pred"][:, m].astype(np.float64))  # genes="selected": the trained genes
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(norm.layers["agl_pred"][:, m], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.expm1(norm.layers["agl_pred"][:, m]).sum(1), 1e4, rtol=1e-4)
    assert (norm.layers["agl_pred"][:, ~m] == 0).all()
    np.testing.assert_allclose(np.asarray(lazy.layers["agl_pred"]), norm.layers["agl_pred"], rtol=1e-6)
    # targets only: the library is still every trained gene, so a target keeps its value
    tgt = small_slide(seed=1)
    agl.tl.agl_predict(tgt, model, genes="targets", scale="log1p_cp10k")
    t = tgt.var["agl_predicted"].to_numpy()
    np.testing.assert_allclose(tgt.layers["agl_pred"][:, t], norm.layers["agl_pred"][:, t], rtol=1e-6)
    he = small_slide(seed=1)[:, []].copy()
    out = agl.tl.predict_anndata(he, model, scale="log1p_cp10k")
    np.testing.assert_allclose(out.X, norm[:, out.var_names].layers["agl_pred"], rtol=1e-6)
    assert not out.uns["agl_pred"]["observed"]
    assert out.var["agl_predicted"].all()
    with pytest.raises(ValueError, match="scale"):
        agl.tl.agl_predict(small_slide(seed=1), model, scale="cp10k")


def test_scale_log1p_cp10k_leaves_a_cpm_model_unchanged():
    a = small_slide()
    model = agl.tl.agl_fit(
        a, method="pgl", embedding_key="X_emb", n_targets=5, min_cells=1, transform="log1p_cpm", **FAST
    )
    one, two = small_slide(seed=1), small_slide(seed=1)
    agl.tl.agl_predict(one, model)
    agl.tl.agl_predict(two, model, scale="log1p_cp10k")
    np.testing.assert_array_equal(one.layers["agl_pred"], two.layers["agl_pred"])


def test_evaluate_scores_the_layer_in_its_own_scale(fitted):
    from agl_scverse._expression import expression_transform
    from agl_scverse._stats import pearson_per_gene

    _, model = fitted
    new = small_slide(seed=1)
    agl.tl.agl_predict(new, model, scale="log1p_cp10k")
    agl.tl.evaluate(new, model, baselines=False)
    test = new.uns["agl"]["metrics"]["test"]
    assert test["transform"] == "log1p_cpm"  # the observed counts go to scanpy's scale as well
    j = new.var_names.get_indexer(model.targets)
    obs = expression_transform(new.X, "log1p_cpm", columns=j)
    r = pearson_per_gene(obs, new.layers["agl_pred"][:, j])
    np.testing.assert_allclose(new.var.loc[model.targets, "agl_pcc"], r, rtol=1e-5)
    few = small_slide(seed=1)
    agl.tl.agl_predict(few, model, genes=model.targets[:2])
    with pytest.raises(KeyError, match="no predictions"):
        agl.tl.evaluate(few, model, baselines=False)  # 3 targets have zeros, not predictions: not scored


def test_predict_from_saved_directory_is_identical(fitted, tmp_path):
    _, model = fitted
    model.save(tmp_path / "m")
    a, b = small_slide(seed=2), small_slide(seed=2)
    agl.tl.agl_predict(a, model)
    agl.tl.agl_predict(b, tmp_path / "m")
    np.testing.assert_array_equal(a.layers["agl_pred"], b.layers["agl_pred"])


def test_he_only_slide_gets_a_new_anndata_from_predict_anndata(fitted):
    _, model = fitted
    full = small_slide(seed=3)
    he = full[:, []].copy()
    he.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 10.0}}}
    snap = snapshot(he)
    with pytest.raises(ValueError, match="predict_anndata"):  # agl_predict writes a layer: it needs the genes
        agl.tl.agl_predict(he, model)
    assert_unchanged(he, snap)
    out = agl.tl.predict_anndata(he, model)
    assert out is not he and he.n_vars == 0 and "agl_pred" not in he.layers
    assert list(out.var_names) == model.predicted_genes
    assert (out.var["agl_role"].astype(str)[:5] == "target").all()
    np.testing.assert_array_equal(out.obsm["spatial"], full.obsm["spatial"])
    assert "spatial" in out.uns and (out.obs_names == full.obs_names).all()
    np.testing.assert_array_equal(out.X, out.layers["agl_pred"])
    idx = [model.genes.index(g) for g in out.var_names]
    np.testing.assert_array_equal(out.X, model.predict(full.obsm["X_emb"])[:, idx])
    lazy = agl.tl.predict_anndata(he, model, max_dense_bytes=0)  # a chunked dask .X (and layer), same numbers
    assert not isinstance(lazy.X, np.ndarray)
    np.testing.assert_array_equal(np.asarray(lazy.X), out.X)
    np.testing.assert_array_equal(np.asarray(lazy.layers["agl_pred"]), out.X)


def _drop_target(a, model):
    keep = ~a.var_names.isin(model.targets[:2])
    return a[:, keep].copy()


def _other_encoder(a, model):
    a.uns["agl_embeddings"] = {"X_emb": {"encoder": "densenet121", "patch_px": 224, "patch_um": 112.0}}
    return a


def _model_records_resnet(model):
    model.config["encoder"] = {
        "encoder": "resnet18",
        "recorded": True,
        "weights_sha256": "",
        "patch_px": 224,
        "patch_um": 112.0,
    }


def _wide(a, model):
    a.obsm["X_emb"] = np.hstack([a.obsm["X_emb"], a.obsm["X_emb"]])
    return a


def _nan(a, model):
    a.obsm["X_emb"][0, 0] = np.nan
    return a


def _no_embedding(a, model):
    del a.obsm["X_emb"]
    return a


@pytest.mark.parametrize(
    ("prepare", "error", "match"),
    [
        (_drop_target, KeyError, "target gene"),
        (_other_encoder, ValueError, "encoder: data 'densenet121' vs model 'resnet18'"),
        (_wide, ValueError, "expects 12 features"),
        (_nan, ValueError, "NaN"),
        (_no_embedding, KeyError, "records no encoder"),
    ],
)
def test_mismatches_are_clear_errors_and_leave_adata_unchanged(fitted, prepare, error, match):
    import copy

    _, model = fitted
    model = copy.deepcopy(model)
    if prepare is _other_encoder:
        _model_records_resnet(model)
    a = prepare(small_slide(seed=4), model)
    snap = snapshot(a)
    with pytest.raises(error, match=match):
        agl.tl.agl_predict(a, model)
    assert_unchanged(a, snap)


def test_missing_weights_file_is_a_clear_error(fitted, tmp_path):
    import copy

    _, model = fitted
    model = copy.deepcopy(model)
    model.config["encoder"] = {
        "encoder": "resnet18", "recorded": True, "weights_sha256": "ab" * 32,
        "weights_path": str(tmp_path / "gone.pth"), "patch_px": 32, "patch_um": 112.0,
    }  # fmt: skip
    a = _no_embedding(small_slide(seed=5), model)
    snap = snapshot(a)
    with pytest.raises(FileNotFoundError, match="Pass weights="):
        agl.tl.agl_predict(a, model)  # the recorded path is never opened
    with pytest.raises(FileNotFoundError, match="is not a file"):
        agl.tl.agl_predict(a, model, weights=tmp_path / "gone.pth")
    assert_unchanged(a, snap)


def test_missing_embeddings_are_computed_with_the_model_settings():
    """agl_fit embeds a slide without features; agl_predict re-embeds a new slide with the recorded settings."""
    kw = {"n_tissue_genes": 10, "n_informative": 10, "n_noise": 20, "n_bursty_noise": 2}
    train = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=0, **kw)
    model = agl.tl.agl_fit(
        train, method="agl", encoder="resnet18", patch_px=32, n_targets=3, min_cells=1, **{**FAST, "epochs": 1}
    )
    assert "X_agl_resnet18" in train.obsm
    rec = train.uns["agl_embeddings"]["X_agl_resnet18"]
    assert rec["patch_px"] == 32 and model.config["encoder"]["patch_px"] == 32
    new = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=1, **kw)
    agl.tl.agl_predict(new, model)
    assert new.uns["agl_embeddings"]["X_agl_resnet18"]["patch_px"] == 32
    tg = new.var_names.isin(model.targets)
    assert np.isfinite(new.layers["agl_pred"][:, tg]).all()
    # the same slide embedded at another patch size is refused
    other = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=1, **kw)
    agl.pp.embed_patches(other, encoder="resnet18", patch_px=48)
    snap = snapshot(other)
    with pytest.raises(ValueError, match="patch_px: data 48 vs model 32"):
        agl.tl.agl_predict(other, model)
    assert_unchanged(other, snap)


def test_a_predicted_slide_carries_the_models_run_for_every_plot(tmp_path):
    """A slide predicted with a loaded model (the CLI's output) plots selected genes, history and performance.

    Regression (issue 20): only spatial_prediction worked; the others raised KeyError 'agl_role'.
    """
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    torch.set_num_threads(1)
    train = small_slide()
    fit = agl.tl.agl_fit(train, method="dkgsb", embedding_key="X_emb", n_targets=5, min_cells=1, **FAST)
    fit.save(tmp_path / "m")
    model = agl.model.AGLModel.load(tmp_path / "m")
    new = small_slide(seed=1)
    agl.tl.agl_predict(new, model)
    agl.tl.evaluate(new, model, baselines=False)
    new.write_h5ad(tmp_path / "p.h5ad")
    new = ad.read_h5ad(tmp_path / "p.h5ad")
    for col in ("agl_role", "agl_prior_rank", "agl_weight", "agl_selected"):  # as the fit wrote them
        np.testing.assert_array_equal(new.var[col].astype(str).to_numpy(), train.var[col].astype(str).to_numpy())
    run, fitted = new.uns["agl"], train.uns["agl"]
    assert run["k"] == fitted["k"] and run["threshold"] == pytest.approx(fitted["threshold"])
    np.testing.assert_allclose(run["history"]["val_pcc"], fitted["history"]["val_pcc"])
    np.testing.assert_array_equal(run["history"]["k"], fitted["history"]["k"])
    assert run["metrics"]["best_epoch"] == fitted["metrics"]["best_epoch"] and "agl_pcc" in new.var
    assert agl.pl.selected_genes(new, show_history=True, show=False).shape == (2,)
    assert agl.pl.training_history(new, show=False).shape == (3,)
    assert agl.pl.gene_performance(new, show=False) is not None
    # the predictions-only AnnData (an H&E-only slide) carries the same description of its genes
    pred = agl.tl.predict_anndata(small_slide(seed=2), tmp_path / "m")
    np.testing.assert_array_equal(pred.var["agl_weight"], train.var.loc[pred.var_names, "agl_weight"])
    assert agl.pl.selected_genes(pred, show=False) is not None and agl.pl.training_history(pred, show=False).size == 3
    # a fitted AnnData keeps its own (richer) record when it is predicted again
    before = train.var["agl_role"].copy(), dict(train.uns["agl"])
    agl.tl.agl_predict(train, model)
    assert train.var["agl_role"].equals(before[0]) and train.uns["agl"].keys() == before[1].keys()
    assert "source" not in train.uns["agl"]


def test_both_front_doors_share_one_path_and_one_signature(fitted):
    """agl_predict (into the slide, or a copy) and predict_anndata (a new AnnData) give the same values (issue 21)."""
    import inspect

    _, model = fitted
    new = small_slide(seed=2)
    before = snapshot(new)
    for genes in ("selected", "targets", [model.genes[-1], model.targets[0]]):
        out = agl.tl.agl_predict(new, model, genes=genes, copy=True)
        assert_unchanged(new, before)  # copy=True: the slide is left as it was
        pred = agl.tl.predict_anndata(new, model, genes=genes)
        names = pred.var_names.tolist()
        assert sorted(names) == sorted(out.var_names[out.var["agl_predicted"]])
        np.testing.assert_array_equal(pred.X, out[:, names].layers["agl_pred"])
        assert pred.uns["agl_pred"]["genes"] == (genes if isinstance(genes, str) else "list")
    door, other = (inspect.signature(f).parameters for f in (agl.tl.agl_predict, agl.tl.predict_anndata))
    assert [p for p in door if p != "copy"] == list(other)
    for name in other:  # one default per parameter
        assert door[name].default == other[name].default, name


def test_device_defaults_to_auto_and_model_predict_returns_the_network_home(fitted):
    import inspect

    from agl_scverse.tl import predict_chunked

    _, model = fitted
    for f in (agl.tl.agl_predict, agl.tl.predict_anndata, predict_chunked, model.predict, agl.pp.embed_patches):
        assert inspect.signature(f).parameters["device"].default == "auto", f
    x = small_slide(seed=1).obsm["X_emb"]
    np.testing.assert_array_equal(model.predict(x), model.predict(x, device="cpu"))
    assert next(model.net.parameters()).device.type == "cpu"


def test_encoder_config_replaces_the_encoder_keywords_of_the_predict_functions(tmp_path):
    """encoder=EncoderConfig / dict predicts as the old keywords did; those warn, naming the new spelling."""
    import inspect
    import warnings

    from agl_scverse.tl import predict_chunked

    kw = {"n_tissue_genes": 10, "n_informative": 10, "n_noise": 20, "n_bursty_noise": 2}
    train = agl.datasets.synthetic_slide(n_rows=4, n_cols=4, seed=0, **kw)
    model = agl.tl.agl_fit(
        train, method="pgl", encoder="resnet18", patch_px=32, n_targets=3, min_cells=1, **{**FAST, "epochs": 1}
    )
    new = agl.datasets.synthetic_slide(n_rows=4, n_cols=4, seed=1, **kw)
    for f in (agl.tl.agl_predict, agl.tl.predict_anndata, predict_chunked):
        params = inspect.signature(f).parameters
        assert "encoder" in params and not {"weights", "precision", "backend", "num_workers"} & set(params)
    with pytest.warns(FutureWarning) as caught:
        old = agl.tl.predict_anndata(new, model, precision="fp32", backend="torch", num_workers=0, device="cpu")
    msg = str(caught[0].message)
    assert msg.startswith("predict_anndata(precision=, backend=, num_workers=) is deprecated")
    assert "use encoder=agl.EncoderConfig(precision=..., backend=..., num_workers=...)" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        by_cfg = agl.tl.predict_anndata(
            new, model, encoder=agl.EncoderConfig(precision="fp32", backend="torch"), device="cpu"
        )
        by_dict = agl.tl.agl_predict(
            new, model, encoder={"precision": "fp32", "backend": "torch"}, device="cpu", copy=True
        )
        chunks = predict_chunked(
            new, model, tmp_path / "c", chunk_size=5, encoder={"precision": "fp32", "backend": "torch"}, device="cpu"
        )
        # the fit's own EncoderConfig, reused: its encoder name is the model's, so it is rebuilt from the record
        fit_cfg = agl.EncoderConfig("resnet18", patch_px=32, precision="fp32", backend="torch")
        warnings.simplefilter("error", UserWarning)  # the model's own settings: nothing to warn about
        reused = agl.tl.predict_anndata(new, model, encoder=fit_cfg, device="cpu")
    key = "X_agl_resnet18"
    np.testing.assert_array_equal(by_cfg.obsm[key], old.obsm[key])
    np.testing.assert_array_equal(by_dict.obsm[key], old.obsm[key])
    np.testing.assert_array_equal(by_cfg.X, old.X)
    np.testing.assert_array_equal(reused.X, old.X)
    np.testing.assert_array_equal(by_dict[:, old.var_names].layers["agl_pred"], old.X)
    np.testing.assert_allclose(chunks.X, old.X, rtol=1e-6, atol=1e-6)
    assert old.uns["agl_embeddings"][key]["backend"] == "torch"
    with pytest.warns(UserWarning, match=r"\['patch_px'\] differ from the model's"):
        agl.tl.predict_anndata(new, model, encoder={"patch_px": 64, "backend": "torch"}, device="cpu")
