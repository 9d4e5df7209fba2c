"""The DkGSB hypergradient: matches finite differences, leaves the network alone, is deterministic."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from agl_scverse.model import (
    AdamState,
    EmbeddingHead,
    FinetuneNet,
    GeneMask,
    hypergradient,
    meta_scope_names,
    unrolled_val_loss,
)
from agl_scverse.train._loss import per_gene_loss, weighted_loss


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
    # "soft": the exact derivative of the unrolled objective; "detached" (legacy): the derivative of the objective
    # with the normaliser sum(w) frozen at its current value -- not of the function it evaluates
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


def _warm_adam(net, data, n_t, steps=3, weight_decay=0.0):
    """An Adam optimiser with a few steps of state (moments, step count) on the weighted training loss."""
    x_tr, y_tr, _, _ = data
    opt = torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        per_gene_loss(net(x_tr), y_tr).mean().backward()
        opt.step()
    return opt


def _real_step_val_loss(net, opt, mask, n_t, data, theta, loss="pearson"):
    """Target validation loss after one *real* Adam step at ``theta`` on copies of the network and optimiser."""
    x_tr, y_tr, x_va, y_va = data
    net2 = copy.deepcopy(net)
    opt2 = torch.optim.Adam(net2.parameters(), **opt.defaults)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    net2.eval()
    with torch.no_grad():
        w = torch.cat([torch.ones(n_t, dtype=torch.float64), torch.sigmoid((theta - mask.ranks) / mask.tau)])
    opt2.zero_grad()
    weighted_loss(per_gene_loss(net2(x_tr), y_tr, loss), w).backward()
    opt2.step()
    with torch.no_grad():
        return float(per_gene_loss(net2(x_va, n_first=n_t), y_va[:, :n_t], loss).mean())


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("loss", ["pearson", "mse"])
def test_adam_lookahead_is_the_real_next_step(weight_decay, loss):
    # the public look-ahead with the live optimiser's state is the network's next training step: its value equals
    # a real torch.optim.Adam step, and its hypergradient the finite difference of that real step
    net, mask, n_t, data = _problem()
    opt = _warm_adam(net, data, n_t, weight_decay=weight_decay)
    state = AdamState.from_optimizer(opt, net)
    assert state.step == 3
    theta0 = mask.threshold
    net.eval()
    lv = float(unrolled_val_loss(net, mask, n_t, *data, loss=loss, optimizer_state=state))
    assert lv == pytest.approx(_real_step_val_loss(net, opt, mask, n_t, data, theta0, loss), rel=1e-9)
    g, lv2 = hypergradient(net, mask, n_t, *data, loss=loss, optimizer_state=state)
    assert lv2 == pytest.approx(lv, rel=1e-12)
    h = 1e-6
    fd = (
        _real_step_val_loss(net, opt, mask, n_t, data, theta0 + h, loss)
        - _real_step_val_loss(net, opt, mask, n_t, data, theta0 - h, loss)
    ) / (2 * h)
    assert abs(float(g)) > 1e-7
    assert float(g) == pytest.approx(fd, rel=1e-4, abs=1e-10)


@pytest.mark.parametrize("inner_steps", [2, 3])
def test_adam_lookahead_over_several_batches_matches_finite_differences(inner_steps):
    # H Adam steps, each on its own training batch, then the validation loss: exact derivative of that function
    net, mask, n_t, (x_tr, y_tr, x_va, y_va) = _problem()
    opt = _warm_adam(net, (x_tr, y_tr, x_va, y_va), n_t)
    state = AdamState.from_optimizer(opt, net)
    xs, ys = [x_tr[:8], x_tr[8:]], [y_tr[:8], y_tr[8:]]
    kw = {"inner_steps": inner_steps, "optimizer_state": state}
    g, _ = hypergradient(net, mask, n_t, xs, ys, x_va, y_va, **kw)
    theta0, h = mask.threshold, 1e-6
    net.eval()
    up = _val_loss_at(net, mask, n_t, (xs, ys, x_va, y_va), theta0 + h, **kw)
    down = _val_loss_at(net, mask, n_t, (xs, ys, x_va, y_va), theta0 - h, **kw)
    assert abs(float(g)) > 1e-8
    assert float(g) == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-11)
    # the second batch matters: a look-ahead on the first batch only is a different function
    g1, _ = hypergradient(net, mask, n_t, xs[:1], ys[:1], x_va, y_va, **kw)
    assert float(g1) != pytest.approx(float(g), rel=1e-3)


def test_detached_normaliser_is_not_the_derivative_of_what_it_evaluates():
    # the legacy surrogate: its gradient differs from the finite difference of its own value (why "soft" is default)
    net, mask, n_t, data = _problem()
    kw = {"inner_steps": 1, "inner_lr": 0.5}
    g, _ = hypergradient(net, mask, n_t, *data, normalizer="detached", **kw)
    theta0, h = mask.threshold, 1e-5
    up = _val_loss_at(net, mask, n_t, data, theta0 + h, normalizer="detached", **kw)
    down = _val_loss_at(net, mask, n_t, data, theta0 - h, normalizer="detached", **kw)
    assert float(g) != pytest.approx((up - down) / (2 * h), rel=1e-2)


def test_adam_state_refuses_other_optimisers():
    net = EmbeddingHead(3, 2, hidden=(4,))
    with pytest.raises(TypeError, match="Adam"):
        AdamState.from_optimizer(torch.optim.SGD(net.parameters(), lr=0.1), net)


# ---------------------------------------------------------------------------------------------- meta_scope
def _deep_problem(seed=0):
    """A network with a two-block trunk (the 'backbone'), its data, and a warm Adam optimiser."""
    net, mask, n_t, data = _problem(seed=seed)
    torch.manual_seed(seed)
    net = EmbeddingHead(5, n_t + 6, hidden=(7, 6), dropout=0.0).double()
    return net, mask, n_t, data, _warm_adam(net, data, n_t)


def test_last_scope_names_the_output_layer_and_the_last_block():
    net, *_ = _deep_problem()
    assert meta_scope_names(net, "last") == ["trunk.3.weight", "trunk.3.bias", "out.weight", "out.bias"]
    assert meta_scope_names(net, "all") == [n for n, _ in net.named_parameters()]
    # fine-tune networks: the last block of the backbone and the final normalisation after it
    bb = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 4, 1)),
        torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    )  # fmt: skip
    names = meta_scope_names(FinetuneNet(bb, 4, 3), "last")
    assert names == ["backbone.1.1.weight", "backbone.1.1.bias", "backbone.2.weight", "backbone.2.bias",
                     "out.weight", "out.bias"]  # fmt: skip


@pytest.mark.parametrize("lookahead", ["adam", "sgd"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_last_scope_hypergradient_matches_finite_differences_of_its_look_ahead(lookahead, inner_steps):
    net, mask, n_t, (x_tr, y_tr, x_va, y_va), opt = _deep_problem()
    state = AdamState.from_optimizer(opt, net) if lookahead == "adam" else None
    data = ([x_tr[:8], x_tr[8:]], [y_tr[:8], y_tr[8:]], x_va, y_va)
    kw = {"inner_steps": inner_steps, "inner_lr": 0.5, "optimizer_state": state, "meta_scope": "last"}
    net.eval()
    g, _ = hypergradient(net, mask, n_t, *data, **kw)
    theta0, h = mask.threshold, 1e-6
    fd = _val_loss_at(net, mask, n_t, data, theta0 + h, **kw) - _val_loss_at(net, mask, n_t, data, theta0 - h, **kw)
    assert abs(float(g)) > 1e-8
    assert float(g) == pytest.approx(fd / (2 * h), rel=1e-4, abs=1e-11)
    # a different function from the full look-ahead (the first trunk layer does not move in it)
    with torch.no_grad():
        mask.theta.fill_(theta0)
    g_all, _ = hypergradient(net, mask, n_t, *data, **{**kw, "meta_scope": "all"})
    assert float(g_all) != pytest.approx(float(g), rel=1e-3)


def test_last_scope_with_one_adam_step_is_the_real_step_of_those_parameters():
    # H = 1, Adam: the look-ahead equals a real torch.optim.Adam step that moves only the scoped parameters
    net, mask, n_t, data, opt = _deep_problem()
    state = AdamState.from_optimizer(opt, net)
    net.eval()
    lv = float(unrolled_val_loss(net, mask, n_t, *data, optimizer_state=state, meta_scope="last"))
    net2 = copy.deepcopy(net)
    opt2 = torch.optim.Adam(net2.parameters(), **opt.defaults)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    scope = set(meta_scope_names(net2, "last"))
    x_tr, y_tr, x_va, y_va = data
    opt2.zero_grad()
    weighted_loss(
        per_gene_loss(net2(x_tr), y_tr), torch.cat([torch.ones(n_t).double(), mask.weights().detach()])
    ).backward()
    for n, p in net2.named_parameters():
        if n not in scope:
            p.grad = None  # Adam skips parameters without a gradient: they stay where they are
    opt2.step()
    with torch.no_grad():
        ref = float(per_gene_loss(net2(x_va, n_first=n_t), y_va[:, :n_t]).mean())
    assert lv == pytest.approx(ref, rel=1e-9)


def test_head_only_look_ahead_carries_no_information_about_the_auxiliaries():
    # why a scope of the output layer alone is refused: with one inner step the auxiliary rows only feed the
    # auxiliary outputs, so theta acts on the targets' step through the normaliser sum(w) only
    from agl_scverse.train._bilevel import _batches, _lookahead_loss

    net, mask, n_t, (x_tr, y_tr, x_va, y_va), opt = _deep_problem()
    state = AdamState.from_optimizer(opt, net)
    net.eval()

    def grad(y, normalizer, names):
        lv = _lookahead_loss(
            net, mask, n_t, _batches(x_tr, y), x_va, y_va, names, inner_steps=1, inner_lr=0.5, loss="pearson",
            normalizer=normalizer, optimizer_state=state,
        )  # fmt: skip
        return float(torch.autograd.grad(lv, mask.theta)[0])

    head, last = ["out.weight", "out.bias"], meta_scope_names(net, "last")
    fixed = float(n_t + mask.weights().detach().sum())
    assert grad(y_tr, fixed, head) == 0.0  # exactly zero with a fixed normaliser
    assert abs(grad(y_tr, fixed, last)) > 1e-8  # the last block carries a signal
    y_alt = y_tr.clone()
    y_alt[:, n_t:] = torch.randn(y_tr.shape[0], y_tr.shape[1] - n_t, generator=torch.Generator().manual_seed(5))
    # "soft": not zero, but the same whatever the auxiliaries' expression (the step-size effect of sum(w))
    assert grad(y_alt, "soft", head) == pytest.approx(grad(y_tr, "soft", head), rel=1e-10)
    assert grad(y_alt, "soft", last) != pytest.approx(grad(y_tr, "soft", last), rel=1e-3)
    with pytest.raises(ValueError, match="only the output layer"):
        hypergradient(net, mask, n_t, x_tr, y_tr, x_va, y_va, meta_scope=head)


def test_bad_meta_scopes_are_clear_errors():
    net, mask, n_t, data, _ = _deep_problem()
    with pytest.raises(ValueError, match="Unknown meta_scope"):
        hypergradient(net, mask, n_t, *data, meta_scope="head")
    with pytest.raises(ValueError, match="not parameters"):
        hypergradient(net, mask, n_t, *data, meta_scope=["trunk.9.weight"])
    linear = EmbeddingHead(5, n_t + 6, hidden=()).double()
    with pytest.raises(ValueError, match="only the output layer"):
        meta_scope_names(linear, "last")
    with pytest.raises(ValueError, match="linear output layer `out`"):
        meta_scope_names(torch.nn.Linear(3, 2), "last")


# ------------------------------------------------------------------------------- the authors' look-ahead
@pytest.mark.parametrize("normalizer", ["soft", "detached"])
@pytest.mark.parametrize("inner_steps", [1, 4])
def test_authors_lookahead_matches_finite_differences(normalizer, inner_steps):
    # a fresh Adam on a copy of the network, H steps on one batch, train mode: the exact derivative of that function
    net, mask, n_t, data = _problem()
    net.train()  # dropout 0 here, so train mode is deterministic
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kw = {"inner_steps": inner_steps, "optimizer_state": AdamState.fresh(net, lr=1e-3)}
    g, _ = hypergradient(net, mask, n_t, *data, normalizer=normalizer, train_mode=True, **kw)
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    fd_norm = "soft" if normalizer == "soft" else float(n_t + mask.weights().detach().sum())
    theta0, h = mask.threshold, 1e-4  # the signal is small (a fresh Adam's step is ~ lr * sign(g)): a wider h
    up = _val_loss_at(net, mask, n_t, data, theta0 + h, normalizer=fd_norm, **kw)
    down = _val_loss_at(net, mask, n_t, data, theta0 - h, normalizer=fd_norm, **kw)
    assert abs(float(g)) > 1e-9
    assert float(g) == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-12)


def test_authors_lookahead_soft_and_detached_agree_where_live_adam_does_not():
    # a fresh Adam's first step is ~ lr * sign(g): the loss scale (the normaliser sum(w)) hardly enters, so the two
    # normalisers give the same hypergradient; under the live (warm) Adam state they differ
    for seed in range(4):
        net, mask, n_t, data = _problem(seed=seed)
        opt = _warm_adam(net, data, n_t)
        auth = {"optimizer_state": AdamState.fresh(net), "inner_steps": 12, "train_mode": True}
        live = {"optimizer_state": AdamState.from_optimizer(opt, net)}
        a_soft, a_det = (
            float(hypergradient(net, mask, n_t, *data, normalizer=n, **auth)[0]) for n in ("soft", "detached")
        )
        l_soft, l_det = (
            float(hypergradient(net, mask, n_t, *data, normalizer=n, **live)[0]) for n in ("soft", "detached")
        )
        assert np.sign(a_soft) == np.sign(a_det) and a_soft == pytest.approx(a_det, rel=1e-3)
        assert l_soft != pytest.approx(l_det, rel=0.1)


def test_authors_lookahead_runs_in_train_mode_on_copies_of_the_batch_statistics():
    # train mode: batch-norm layers use batch statistics in the look-ahead, and their running statistics (updated in
    # place by a train-mode forward) are copies, so the network is left as it was
    torch.manual_seed(0)
    bb = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )  # fmt: skip
    net = FinetuneNet(bb, 4, 5)  # float32: the network takes image batches as float
    mask = GeneMask(torch.linspace(0, 1, 3), tau=0.2, theta=0.5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 8, 8, generator=g), torch.randn(8, 5, generator=g)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kw = {"optimizer_state": AdamState.fresh(net, lr=1e-2), "inner_steps": 2}
    g_tr, lv_tr = hypergradient(net, mask, 2, x, y, x, y, train_mode=True, **kw)
    g_ev, lv_ev = hypergradient(net, mask, 2, x, y, x, y, **kw)
    assert not net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert lv_tr != pytest.approx(lv_ev, rel=1e-6) and np.isfinite(float(g_tr))
