"""Bad tool inputs (the "hardening" issue): each is a clear error raised before anything is written, or a warning.

Covered: NaN counts in ``evaluate``, Ctrl-C during ``agl_fit`` (training and the final write), batches too small to
train, a training loss that is NaN in every epoch, transformed (non-integer) counts, a constant embedding,
duplicated gene names and gene names that match none of the model's.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from builders import FAST, assert_unchanged, small_slide, snapshot

import agl_scverse as agl
from agl_scverse.model import EmbeddingHead, _trainer, train_network
from agl_scverse.model._trainer import TensorInputs

FIT = {"embedding_key": "X_emb", "n_targets": 5, "min_cells": 1, **FAST}


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    adata = small_slide(n=160)
    held = np.arange(adata.n_obs) >= 120
    model = agl.tl.agl_fit(adata, method="pgl", spots=~held, **FIT)
    return adata, model


def _with_nan(adata, rows):
    X = adata.X.toarray()
    X[rows, 0] = np.nan
    adata.X = sp.csr_matrix(X)


# ------------------------------------------------------------------------------------------------ 1. evaluate
@pytest.mark.parametrize("rows", [[150], [3]], ids=["evaluated_spot", "training_spot"])
def test_evaluate_nan_counts_raise_before_predicting_or_writing(fitted, rows):
    adata, model = fitted
    a = adata.copy()
    _with_nan(a, rows)  # held-out (evaluated) spot, or a training spot the baselines are fitted on
    assert "agl_pred" not in a.layers
    snap = snapshot(a)
    with pytest.raises(ValueError, match="NaN/inf"):
        agl.tl.evaluate(a, model)
    assert_unchanged(a, snap)
    assert "agl_pred" not in a.layers and "agl_pcc" not in a.var


# ------------------------------------------------------------------------------------------------ 2. Ctrl-C
def _image_slide():
    kw = {"n_tissue_genes": 10, "n_informative": 10, "n_noise": 20, "n_bursty_noise": 2}
    return agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=0, **kw)


def _interrupt_training(monkeypatch):
    calls = []
    loss = _trainer.weighted_loss

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # in the middle of the first epoch
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    monkeypatch.setattr(_trainer, "weighted_loss", stop)


def _interrupt_write(monkeypatch):
    from agl_scverse.tl import _fit

    def stop(*args, **kwargs):  # the last statement of the write block, after every other write
        raise KeyboardInterrupt

    monkeypatch.setattr(_fit, "to_h5ad", stop)


@pytest.mark.parametrize("interrupt", [_interrupt_training, _interrupt_write], ids=["training", "final_write"])
def test_ctrl_c_in_agl_fit_leaves_no_embedding_and_no_results(monkeypatch, interrupt):
    adata = _image_slide()
    assert "X_agl_resnet18" not in adata.obsm  # agl_fit embeds the slide itself
    snap = snapshot(adata)
    interrupt(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        agl.tl.agl_fit(adata, method="agl", encoder="resnet18", patch_px=32, n_targets=3, min_cells=1, **FAST)
    assert_unchanged(adata, snap)
    assert "X_agl_resnet18" not in adata.obsm and "agl_embeddings" not in adata.uns and "agl" not in adata.uns
    assert "agl_split" not in adata.obs and "agl_role" not in adata.var


# ------------------------------------------------------------------------------------------------ 3. batches
def test_batch_size_under_two_is_refused_before_anything():
    adata = small_slide()
    snap = snapshot(adata)
    with pytest.raises(ValueError, match="batch_size=1 leaves every training batch"):
        agl.tl.agl_fit(adata, method="pgl", **{**FIT, "batch_size": 1})
    assert_unchanged(adata, snap)


class _RecordingInputs(TensorInputs):
    def __init__(self, X):
        super().__init__(X)
        self.sizes = []

    def __call__(self, idx):
        self.sizes.append(len(np.asarray(idx)))
        return super().__call__(idx)


@pytest.mark.parametrize(("n_train", "batch_size", "expected"), [(3, 2, [3]), (65, 32, [32, 33]), (64, 32, [32, 32])])
def test_a_last_batch_of_one_spot_joins_the_one_before(n_train, batch_size, expected):
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(n_train + 10, 6)), rng.normal(size=(n_train + 10, 3))
    inputs = _RecordingInputs(X)
    net = EmbeddingHead(6, 3, hidden=(8,))
    res = train_network(net, inputs, Y, np.arange(n_train), np.arange(n_train, n_train + 10), 2,
                        training={"epochs": 1, "batch_size": batch_size}, progress=False)  # fmt: skip
    assert inputs.sizes[: len(expected)] == expected  # the training batches of the epoch, then validation
    assert np.isfinite(res.history["train_loss"]).all()


def test_train_network_refuses_one_training_spot_and_batch_size_one():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
    net = EmbeddingHead(4, 3, hidden=(8,))
    with pytest.raises(ValueError, match="1 training spot"):
        train_network(
            net, TensorInputs(X), Y, np.arange(1), np.arange(1, 20), 2, training={"epochs": 1}, progress=False
        )
    with pytest.raises(ValueError, match="batch_size=1"):
        train_network(net, TensorInputs(X), Y, np.arange(10), np.arange(10, 20), 2, training={"batch_size": 1},
                      progress=False)  # fmt: skip


def test_a_training_loss_nan_in_every_epoch_is_an_error_not_a_model(monkeypatch):
    adata = small_slide()
    snap = snapshot(adata)
    loss = _trainer.weighted_loss
    monkeypatch.setattr(_trainer, "weighted_loss", lambda *a, **k: loss(*a, **k) * float("nan"))
    with pytest.raises(RuntimeError, match="NaN/inf in all 4 epoch"):
        agl.tl.agl_fit(adata, method="pgl", **FIT)
    assert_unchanged(adata, snap)


# ------------------------------------------------------------------------------------------------ 4. counts scale
def _log1p(a):
    a.X = a.X.log1p()


def _scaled(a):
    a.X = a.X * 0.37


def _scanpy_log1p(a):
    import scanpy as sc

    sc.pp.log1p(a)


TRANSFORMED = [_log1p, _scaled, _scanpy_log1p]


@pytest.mark.parametrize("prepare", TRANSFORMED, ids=["log1p", "scaled", "scanpy_log1p"])
def test_agl_fit_refuses_transformed_counts_and_names_the_fix(prepare):
    adata = small_slide()
    prepare(adata)
    snap = snapshot(adata)
    with pytest.raises(ValueError, match="non-integer values.*layer='counts'.*transform='none'") as err:
        agl.tl.agl_fit(adata, method="pgl", **FIT)
    if prepare is _scanpy_log1p:
        assert "adata.uns['log1p'] is set" in str(err.value)
    assert_unchanged(adata, snap)


def test_transformed_counts_are_accepted_with_transform_none_or_the_counts_layer():
    adata = small_slide()
    adata.layers["counts"] = adata.X.copy()
    _log1p(adata)
    agl.tl.agl_fit(adata.copy(), method="pgl", transform="none", **FIT)
    agl.tl.agl_fit(adata, method="pgl", layer="counts", **FIT)
    assert adata.uns["agl"]["params"]["layer"] == "counts"


def test_whole_counts_with_a_stale_log1p_record_warn_but_train():
    adata = small_slide()
    adata.uns["log1p"] = {"base": None}
    with pytest.warns(UserWarning, match="holds whole numbers"):
        agl.tl.agl_fit(adata, method="pgl", **FIT)


@pytest.mark.parametrize("prepare", [_log1p, _scaled], ids=["log1p", "scaled"])
def test_evaluate_refuses_transformed_counts(fitted, prepare):
    adata, model = fitted
    a = adata.copy()
    prepare(a)
    snap = snapshot(a)
    with pytest.raises(ValueError, match="non-integer values"):
        agl.tl.evaluate(a, model)
    assert_unchanged(a, snap)


def test_compare_and_cross_validate_refuse_transformed_counts():
    adata = small_slide()
    _log1p(adata)
    snap = snapshot(adata)
    with pytest.raises(ValueError, match="non-integer values"):
        agl.tl.compare_methods(adata, ("pgl",), **FIT)
    with pytest.raises(ValueError, match="non-integer values"):
        agl.tl.cross_validate(adata, "slide", methods=("pgl",), embedding_key="X_emb", n_targets=5, progress=False)
    assert_unchanged(adata, snap)


def test_synthetic_slide_counts_are_whole_numbers():
    from agl_scverse._validate import check_integer_counts

    a = agl.datasets.synthetic_slide(n_rows=5, n_cols=5, seed=0)
    check_integer_counts(a.X)  # the tutorial data passes the check


def test_the_integer_check_reads_a_sample_only():
    from agl_scverse import _validate

    big = sp.random(20_000, 2_000, density=0.1, format="csr", random_state=0, dtype=np.float32)
    big.data = np.round(big.data * 10)
    assert _validate._sample_values(big).size <= 2 * _validate.INTEGER_SAMPLE
    _validate.check_integer_counts(big)
    big.data[::7] += 0.5  # a seventh of the values are not whole: the evenly spread sample sees them
    with pytest.raises(ValueError, match="non-integer"):
        _validate.check_integer_counts(big)


# ------------------------------------------------------------------------------------------------ 5. embedding
def test_a_constant_embedding_is_refused():
    adata = small_slide()
    adata.obsm["X_emb"][:] = 0.25
    snap = snapshot(adata)
    with pytest.raises(ValueError, match="constant over the 96 training spots"):
        agl.tl.agl_fit(adata, method="pgl", **FIT)
    assert_unchanged(adata, snap)


def test_a_mostly_constant_embedding_warns():
    adata = small_slide()
    adata.obsm["X_emb"][:, 2:] = 1.0  # 10 of 12 features constant
    with pytest.warns(UserWarning, match="10 of 12 features are constant"):
        agl.tl.agl_fit(adata, method="pgl", **FIT)
    few = small_slide()
    few.obsm["X_emb"][:, :2] = 1.0  # 2 of 12: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        agl.tl.agl_fit(few, method="pgl", **FIT)


# ------------------------------------------------------------------------------------------------ 8. gene names
def _duplicate_names(a):
    a.var_names = ["g1", "g1", *a.var_names[2:]]


@pytest.mark.parametrize("tool", ["agl_predict", "evaluate"])
def test_duplicated_var_names_name_the_fix(fitted, tool):
    _, model = fitted
    a = small_slide(seed=2)
    _duplicate_names(a)
    snap = snapshot(a)
    with pytest.raises(ValueError, match=r"Duplicate gene names \['g1'\].*var_names_make_unique"):
        getattr(agl.tl, tool)(a, model)
    assert_unchanged(a, snap)


def test_no_model_gene_in_the_slide_is_a_clear_error(fitted):
    _, model = fitted
    a = small_slide(seed=2)
    a.var_names = [f"ENSG{i:05d}" for i in range(a.n_vars)]
    snap = snapshot(a)
    with pytest.raises(KeyError, match="None of the model's 5 genes.*symbols vs Ensembl"):
        agl.tl.agl_predict(a, model)
    assert_unchanged(a, snap)


# ------------------------------------------------------------------------------------------------ 9. keys we own
@pytest.mark.parametrize("key", ["spatial", "pca"])
def test_agl_fit_refuses_a_key_added_that_names_data_that_is_not_ours(key):
    """key_added="spatial" would have replaced .uns["spatial"] (images, scale factors) with the results."""
    a = small_slide()
    a.uns[key] = {
        "A": {"images": {"hires": np.zeros((4, 4, 3), np.uint8)}, "scalefactors": {"spot_diameter_fullres": 5}}
    }
    snap, before = snapshot(a), a.uns[key]
    with pytest.raises(ValueError, match=rf"\.uns\['{key}'\].*refusing to replace"):
        agl.tl.agl_fit(a, key_added=key, **FIT)
    assert_unchanged(a, snap)
    assert a.uns[key] is before


def test_reserved_uns_keys_are_refused_even_when_absent_and_foreign_columns_are_named():
    a = small_slide()
    with pytest.raises(ValueError, match=r"\.uns\['spatial'\], which belongs to scanpy"):
        agl.tl.agl_fit(a, key_added="spatial", **FIT)
    a.var["run1_role"] = "mine"  # a user's column that agl_fit(key_added="run1") would write
    a.obs["run1_split"] = "mine"
    snap = snapshot(a)
    with pytest.raises(ValueError, match=r"\.var\['run1_role'\], \.obs\['run1_split'\] already exist and were not"):
        agl.tl.agl_fit(a, key_added="run1", **FIT)
    assert_unchanged(a, snap)


def test_our_own_keys_are_rewritten_and_survive_h5ad(tmp_path):
    import anndata as ad

    a = small_slide()
    agl.tl.agl_fit(a, key_added="run1", **FIT)
    assert set(a.uns["run1"]["agl_keys"]["var"]) >= {"run1_role", "run1_weight"}
    a.write_h5ad(tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    model = agl.tl.agl_fit(b, key_added="run1", **FIT)  # a second run of ours replaces the first
    agl.tl.agl_predict(b, model, key_added="run1")
    assert "run1_pred" in b.layers and "run1_predicted" in b.var
    b.uns["mine_pred"] = {"mine": 1}  # a user's entry of the name agl_predict(key_added="mine") would write
    with pytest.raises(ValueError, match=r"\.uns\['mine_pred'\] already exists"):
        agl.tl.agl_predict(b, model, key_added="mine")
    assert "mine_pred" not in b.layers
    with pytest.raises(ValueError, match=r"\.uns\['x'\] already exists"):
        b.uns["x"] = {"mine": 1}
        agl.tl.agl_fit(b, key_added="x", **FIT)


def test_cross_validate_refuses_a_foreign_key_added_before_the_folds():
    a = small_slide()
    a.uns["neighbors"] = {"params": {"n_neighbors": 15}}
    with pytest.raises(ValueError, match=r"\.uns\['neighbors'\]"):
        agl.tl.cross_validate(a, group_key="slide", embedding_key="X_emb", key_added="neighbors", n_targets=5)
    assert a.uns["neighbors"] == {"params": {"n_neighbors": 15}}


# ------------------------------------------------------------------------------------------------ 10. genes, slides
def test_genes_all_on_a_slide_lacking_auxiliaries_warns_naming_them():
    a = small_slide()
    model = agl.tl.agl_fit(a, method="agl", **FIT)
    aux = [g for g, r in zip(model.genes, model.roles) if r == "auxiliary"]
    lacking = small_slide(seed=2)
    lacking = lacking[:, ~lacking.var_names.isin(aux[:20])].copy()
    with pytest.warns(UserWarning, match=rf"genes='all' asks for {len(model.genes)} genes, but the slide lacks 20"):
        agl.tl.agl_predict(lacking, model, genes="all")
    assert lacking.var["agl_predicted"].sum() == len(model.genes) - 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agl.tl.agl_predict(small_slide(seed=2), model, genes="all")  # a complete slide: no warning


@pytest.mark.parametrize(
    ("column", "kind"),
    [(lambda a: (np.arange(a.n_obs) // 4).astype(np.int64), "integer"), (lambda a: a.obsm["spatial"][:, 1], "float")],
    ids=["array_row-like-integers", "float-coordinates"],
)
def test_a_numeric_library_key_is_refused(column, kind):
    a = small_slide()
    a.obs["array_row"] = column(a)
    snap = snapshot(a)
    with pytest.raises(ValueError, match=rf"library_key='array_row' is a {kind} column with \d+ distinct values"):
        agl.tl.agl_fit(a, library_key="array_row", **FIT)
    assert_unchanged(a, snap)


def test_a_few_integer_or_categorical_slide_labels_are_accepted():
    from agl_scverse._spatial import resolve_library_key

    a = small_slide()
    a.obs["section"] = (np.arange(a.n_obs) >= 60).astype(int)
    assert resolve_library_key(a, "section") == "section"
    a.obs["rows"] = pd.Categorical(np.arange(a.n_obs) // 2)  # categorical: the user says these are slides
    assert resolve_library_key(a, "rows") == "rows"
