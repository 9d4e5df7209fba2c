"""The DkGSB hypergradient: matches finite differences, leaves the network alone, is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agl_scverse.model import EmbeddingHead, GeneMask, hypergradient, unrolled_val_loss


def _problem(n_t=3, n_aux=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = EmbeddingHead(5, n_t + n_aux, hidden=(7,), dropout=0.0).double()
    ranks = torch.linspace(0, 1, n_aux, dtype=torch.float64)
    # tau larger than the paper's 0.01 so that several auxiliaries sit on the soft edge of the mask
    mask = GeneMask(ranks, tau=0.2, theta=0.45, dtype=torch.float64)
    x_tr = torch.randn(16, 5, generator=g, dtype=torch.float64)
    x_va = torch.randn(12, 5, generator=g, dtype=torch.float64)
    W = torch.randn(5, n_t + n_aux, generator=g, dtype=torch.float64)
    y_tr = torch.tanh(x_tr @ W) + 0.1 * torch.randn(16, n_t + n_aux, generator=g, dtype=torch.float64)
    y_va = torch.tanh(x_va @ W) + 0.1 * torch.randn(12, n_t + n_aux, generator=g, dtype=torch.float64)
    return net, mask, n_t, (x_tr, y_tr, x_va, y_va)


def _val_loss_at(net, mask, n_t, data, theta, **kw):
    with torch.no_grad():
        mask.theta.fill_(theta)
    return float(unrolled_val_loss(net, mask, n_t, *data, **kw).detach())


@pytest.mark.parametrize("inner_steps", [1, 3])
@pytest.mark.parametrize("loss", ["pearson", "mse"])
@pytest.mark.parametrize("normalizer", ["soft", "detached"])
def test_hypergradient_matches_central_finite_difference(inner_steps, loss, normalizer):
    net, mask, n_t, data = _problem()
    kw = {"inner_steps": inner_steps, "inner_lr": 0.5, "loss": loss}
    theta0 = mask.threshold
    g, _ = hypergradient(net, mask, n_t, *data, normalizer=normalizer, **kw)
    # "soft": the exact derivative of the unrolled objective; "detached": the same objective with the
    # normaliser sum(w) frozen at its current value (the meta objective DkGSB uses by default)
    fd_norm = "soft" if normalizer == "soft" else float(n_t + mask.weights().detach().sum())
    h = 1e-5
    up = _val_loss_at(net, mask, n_t, data, theta0 + h, normalizer=fd_norm, **kw)
    down = _val_loss_at(net, mask, n_t, data, theta0 - h, normalizer=fd_norm, **kw)
    fd = (up - down) / (2 * h)
    assert abs(float(g)) > 1e-6  # a real signal, not a vanishing gradient
    assert float(g) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_hypergradient_is_zero_without_inner_step_effect():
    # inner_lr -> 0: the network does not move, so theta cannot influence the validation loss
    net, mask, n_t, data = _problem()
    g, _ = hypergradient(net, mask, n_t, *data, inner_steps=1, inner_lr=1e-12)
    assert abs(float(g)) < 1e-9


def test_hypergradient_leaves_network_untouched_and_is_deterministic():
    net, mask, n_t, data = _problem()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g1, l1 = hypergradient(net, mask, n_t, *data)
    g2, l2 = hypergradient(net, mask, n_t, *data)
    assert net.training  # mode restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in net.parameters())
    assert float(g1) == float(g2) and l1 == l2


def test_weighted_loss_follows_the_mask():
    # auxiliaries far below the threshold have weight ~0: their values cannot change the inner step
    net, mask, n_t, (x_tr, y_tr, x_va, y_va) = _problem()
    with torch.no_grad():
        mask.theta.fill_(-5.0)  # every auxiliary excluded
    y_alt = y_tr.clone()
    y_alt[:, n_t:] = torch.randn_like(y_alt[:, n_t:])
    a = float(unrolled_val_loss(net, mask, n_t, x_tr, y_tr, x_va, y_va, inner_lr=0.5))
    b = float(unrolled_val_loss(net, mask, n_t, x_tr, y_alt, x_va, y_va, inner_lr=0.5))
    assert a == pytest.approx(b, abs=1e-10)
    with torch.no_grad():
        mask.theta.fill_(0.5)
    c = float(unrolled_val_loss(net, mask, n_t, x_tr, y_alt, x_va, y_va, inner_lr=0.5))
    assert abs(c - a) > 1e-6
    assert np.isfinite(c)
