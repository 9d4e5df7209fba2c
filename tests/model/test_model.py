"""Model parts: losses, mask, heads, trainer (determinism, early stopping), AGLModel save/load (atomic)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agl_scverse._stats import per_gene_metrics
from agl_scverse.model import AGLModel, EmbeddingHead, FinetuneNet, GeneMask, pearson_loss, train_network, weighted_loss
from agl_scverse.model import _checkpoint as ckpt
from agl_scverse.model._mask import normalized_ranks
from agl_scverse.model._trainer import TensorInputs, genes_for_method, val_pcc


# ------------------------------------------------------------------------------------------------ losses
def test_pearson_loss_matches_numpy_and_is_safe_for_constant_genes():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    got = pearson_loss(torch.tensor(a), torch.tensor(b)).numpy()
    want = 1 - np.array([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(4)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    pred = torch.tensor(a, requires_grad=True)
    const = torch.zeros(30, 4, dtype=torch.float64)
    L = pearson_loss(pred, const)
    L.sum().backward()
    assert torch.allclose(L, torch.ones(4, dtype=torch.float64))
    assert torch.isfinite(pred.grad).all()


def test_weighted_loss_is_weighted_mean():
    L = torch.tensor([1.0, 2.0, 4.0])
    assert float(weighted_loss(L, torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(1.5)
    assert float(weighted_loss(L, torch.tensor([1.0, 0.5, 0.5]))) == pytest.approx((1 + 1 + 2) / 2)


# ------------------------------------------------------------------------------------------------ mask
def test_normalized_ranks_and_mask_selection():
    r = normalized_ranks([5, 1, 3, 2, 4])
    np.testing.assert_allclose(r, [1.0, 0.0, 0.5, 0.25, 0.75])
    m = GeneMask(np.linspace(0, 1, 101), tau=0.01)
    assert m.threshold == pytest.approx(0.5)
    assert m.k == 50  # r < 0.5 strictly
    w = m.weights().detach().numpy()
    assert w[0] > 0.99 and w[-1] < 0.01 and np.all(np.diff(w) <= 0)
    with torch.no_grad():
        m.theta.fill_(1.7)
    m.clamp_()
    assert m.threshold == 1.0
    with pytest.raises(ValueError, match="tau"):
        GeneMask([0.0, 1.0], tau=0)


def test_genes_for_method():
    assert genes_for_method("pgl", 5).size == 0
    assert genes_for_method("agl", 5).tolist() == [0, 1, 2, 3, 4]
    assert genes_for_method("topk", 5, k=2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="k=9"):
        genes_for_method("topk", 5, k=9)
    with pytest.raises(ValueError, match="Unknown method"):
        genes_for_method("foo", 5)


# ------------------------------------------------------------------------------------------------ heads
def test_embedding_head_standardises_input_and_calibrates():
    net = EmbeddingHead(3, 2, hidden=(4,), dropout=0.0)
    net.set_input_scaling(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 0.0, 1.0]))
    assert torch.all(net.x_std > 0)  # zero std floored
    x = torch.randn(5, 3)
    net.out_scale.fill_(2.0)
    net.out_shift.fill_(1.0)
    assert torch.allclose(net.predict_expression(x), 2 * net(x) + 1)
    lin = EmbeddingHead(3, 2, hidden=())
    assert len(list(lin.trunk.children())) == 0


def test_finetune_net_accepts_uint8_patches_channels_last():
    bb = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))
    net = FinetuneNet(bb, 6, 4)
    x = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)
    a = net(x)
    b = net(x.permute(0, 2, 3, 1).contiguous())
    assert torch.allclose(a, b)


# ------------------------------------------------------------------------------------------------ trainer
def _toy(seed=0, n=120, d=10, n_t=3, n_aux=12):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    Z = np.tanh(X @ rng.normal(size=(d, 3)))
    Y = (Z @ rng.normal(size=(3, n_t + n_aux)) + 0.5 * rng.normal(size=(n, n_t + n_aux))).astype(np.float32)
    return X, Y, n_t, n_aux


def _fit(method="dkgsb", seed=0, epochs=4, **kw):
    X, Y, n_t, n_aux = _toy()
    torch.manual_seed(seed)
    net = EmbeddingHead(X.shape[1], n_t + n_aux, hidden=(16,), dropout=0.1)
    net.set_input_scaling(torch.tensor(X.mean(0)), torch.tensor(X.std(0)))
    mask = GeneMask(normalized_ranks(np.arange(n_aux)), tau=0.01) if method == "dkgsb" else None
    res = train_network(
        net, TensorInputs(X), Y, np.arange(80), np.arange(80, 120), n_t, mask=mask,
        training={"epochs": epochs, "patience": 50, "batch_size": 32}, dkgsb={"meta_batch_size": 32}, seed=seed,
        progress=False, **kw,
    )  # fmt: skip
    return net, mask, res, X, Y


def test_trainer_is_deterministic_for_a_seed():
    net1, m1, r1, X, _ = _fit(seed=3)
    net2, m2, r2, _, _ = _fit(seed=3)
    assert r1.history["val_pcc"] == r2.history["val_pcc"]
    assert r1.history["theta"] == r2.history["theta"] and r1.k == r2.k
    with torch.no_grad():
        assert torch.equal(net1.predict_expression(torch.tensor(X)), net2.predict_expression(torch.tensor(X)))
    _, _, r3, _, _ = _fit(seed=4)
    assert r3.history["val_pcc"] != r1.history["val_pcc"]


def test_trainer_history_theta_moves_and_best_epoch_is_restored():
    net, mask, res, X, Y = _fit(epochs=6)
    h = res.history
    assert h["epoch"] == list(range(6))
    assert len(set(h["theta"])) > 1  # the bi-level step moved the threshold (not in epoch 0)
    assert h["theta"][0] == pytest.approx(0.5)
    assert res.best_val_pcc == pytest.approx(max(h["val_pcc"]))
    # the restored network gives the best epoch's validation PCC
    Yt = torch.tensor(Y)
    pcc = val_pcc(net, TensorInputs(X), Yt, np.arange(80, 120), 3)
    assert pcc == pytest.approx(res.best_val_pcc, abs=1e-5)
    assert mask.threshold == pytest.approx(h["theta"][res.best_epoch])


def test_trainer_calibration_puts_predictions_on_the_expression_scale():
    net, _, _, X, Y = _fit(method="agl", epochs=5)
    with torch.no_grad():
        pred = net.predict_expression(torch.tensor(X[:80])).numpy()
    # least squares on the training spots: mean of the predictions = mean of the observations
    np.testing.assert_allclose(pred.mean(0), Y[:80].mean(0), atol=1e-3)


def test_early_stopping_stops():
    X, Y, n_t, n_aux = _toy()
    rng = np.random.default_rng(1)
    Yn = rng.normal(size=Y.shape).astype(np.float32)  # nothing to learn: validation PCC does not improve
    net = EmbeddingHead(X.shape[1], Y.shape[1], hidden=(8,))
    res = train_network(net, TensorInputs(X), Yn, np.arange(80), np.arange(80, 120), n_t,
                        training={"epochs": 200, "patience": 3}, progress=False)  # fmt: skip
    assert len(res.history["epoch"]) < 200
    assert len(res.history["epoch"]) - 1 - res.best_epoch == 3


# ------------------------------------------------------------------------------------------------ AGLModel
def _model():
    net, mask, res, X, Y = _fit(epochs=2)
    genes = [f"g{i}" for i in range(Y.shape[1])]
    w = np.concatenate([np.ones(3), mask.weights().detach().numpy()])
    cfg = {"genes": genes, "roles": ["target"] * 3 + ["auxiliary"] * 12, "weights": w, "method": "dkgsb", "k": mask.k}
    return AGLModel(net, cfg), X


def test_save_load_predicts_bit_for_bit(tmp_path):
    model, X = _model()
    p = model.save(tmp_path / "m")
    assert sorted(x.name for x in p.iterdir()) == ["config.json", "model.safetensors"]
    loaded = AGLModel.load(p)
    assert np.array_equal(model.predict(X), loaded.predict(X))
    assert loaded.genes == model.genes and loaded.k == model.k and loaded.method == "dkgsb"
    assert loaded.predicted_genes == model.predicted_genes
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a saved AGL model"):
        AGLModel.load(tmp_path)


def test_atomic_save_failure_leaves_nothing_and_keeps_existing(tmp_path, monkeypatch):
    model, X = _model()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.json, "dump", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # no target, no temporary directory left

    monkeypatch.undo()
    model.save(tmp_path / "old")
    before = {f.name: f.read_bytes() for f in (tmp_path / "old").iterdir()}
    other, _ = _model()
    other.config["method"] = "agl"
    monkeypatch.setattr(ckpt.json, "dump", boom)
    with pytest.raises(RuntimeError):
        other.save(tmp_path / "old", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert {f.name: f.read_bytes() for f in (tmp_path / "old").iterdir()} == before
    monkeypatch.undo()
    other.save(tmp_path / "old", overwrite=True)
    assert json.loads((tmp_path / "old" / "config.json").read_text())["method"] == "agl"
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_val_pcc_scores_constant_predictions_as_zero_like_evaluate():
    # regression: early stopping averaged with nanmean over the genes with a varying prediction only, so a network
    # informative for 1 target of 4 (the others constant) scored that gene's r (~1) where evaluate gives ~1/4
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3)).astype(np.float32)
    Y = np.column_stack([X[:, 0] + 0.05 * rng.normal(size=60), rng.normal(size=(60, 3))]).astype(np.float32)
    net = EmbeddingHead(3, 4, hidden=(), dropout=0.0)
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.weight[0, 0] = 1.0  # gene 0 follows feature 0; genes 1-3 get a constant output (their bias)
        net.out.bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1]))
    idx = np.arange(60)
    r0 = float(np.corrcoef(X[:, 0], Y[:, 0])[0, 1])
    pcc = val_pcc(net, TensorInputs(X), Y, idx, 4)
    assert pcc == pytest.approx(r0 / 4, abs=1e-4)
    pred = net.eval()(torch.as_tensor(X)).detach().numpy()
    assert pcc == pytest.approx(float(per_gene_metrics(Y, pred)["pearson"].mean()), abs=1e-5)  # evaluate's mean
