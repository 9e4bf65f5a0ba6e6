"""K-BFGS / K-BFGS(L) (docs/kronecker.md): exactly checkable properties of the math (double
damping, BFGS, Hessian-action BFGS, homogeneous coordinate, cautious skip, paper parameter
counts; test names ``ok3``..``ok8``), full steps against an independent dense float64
reimplementation, the second pass and the zero-started A against it, K-BFGS(L) = K-BFGS
below capacity, Conv2d pairs against an explicit computation, no host sync, exact resume,
errors."""

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from counting_backend import GRAPHS
from counting_backend import NAME as COUNTING
from layer_helpers import make_closure, no_host_sync, wtilde
from torch import nn

from secant import KBFGS, KBFGSL
from secant.linalg import bfgs_inverse_update_, double_damping

D = torch.float64


def dense_bfgs(h, s, y):
    rho = 1.0 / (s @ y)
    left = torch.eye(len(s), dtype=D) - rho * torch.outer(s, y)
    return left @ h @ left.T + rho * torch.outer(s, s)


def mlp(seed=0, sizes=(5, 4, 3), dtype=D):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def batches(n_steps, n=9, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g))
            for _ in range(n_steps)]


# ---------------------------------------------------------------- oracles on the math
def test_ok3_double_damping_invariants():
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = 0.2, math.sqrt(0.3)
    n = 6
    for _ in range(300):
        q = torch.randn(n, n, generator=gen, dtype=D)
        h = q @ q.T + 0.1 * torch.eye(n, dtype=D)
        s = torch.randn(n, generator=gen, dtype=D)
        y = torch.randn(n, generator=gen, dtype=D) * 10 ** torch.empty(1, dtype=D).uniform_(
            -2, 2, generator=gen)
        hy = h @ y
        s1 = s if s @ y >= mu1 * (y @ hy) else None
        st, yt, step1, step2 = double_damping(s, y, hy, mu1, mu2)
        assert bool(step1) == (s1 is None)
        assert bool(step2) == bool(st @ y < mu2 * (st @ st))
        if s1 is None:  # step 1 active: equality on H
            assert float(st @ y) == pytest.approx(float(mu1 * (y @ hy)), rel=1e-9)
        assert float(st @ yt) >= float(mu2 * (st @ st)) * (1 - 1e-12)
        h_new = dense_bfgs(h, st, yt)
        assert torch.linalg.eigvalsh(h_new).min() > 0
    # pairs satisfying both conditions are unchanged
    s = torch.randn(n, generator=gen, dtype=D)
    y = s.clone()
    st, yt, step1, step2 = double_damping(s, y, y, mu1, mu2)
    assert torch.equal(st, s) and torch.equal(yt, y) and not step1 and not step2


def test_in_place_masked_bfgs_update_matches_dense():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 5, generator=gen, dtype=D)
    h = q @ q.T + torch.eye(5, dtype=D)
    s, y = torch.randn(5, generator=gen, dtype=D), torch.randn(5, generator=gen, dtype=D)
    y = y + 3 * s  # sᵀy > 0
    want = dense_bfgs(h, s, y)
    got = h.clone()
    assert bool(bfgs_inverse_update_(got, s, y, torch.tensor(True)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got @ y, s, rtol=1e-10, atol=1e-12)  # secant equation
    same = h.clone()
    assert not bool(bfgs_inverse_update_(same, s, y, torch.tensor(False)))
    assert torch.equal(same, h)
    nan_s = torch.full_like(s, float("nan"))
    assert not bool(bfgs_inverse_update_(same, nan_s, y, torch.tensor(True)))
    assert torch.equal(same, h)


def test_ok5_hessian_action_bfgs_fixed_point_and_convergence():
    gen = torch.Generator().manual_seed(1)
    n, lam = 6, 0.1
    q = torch.randn(n, n, generator=gen, dtype=D)
    a = q @ q.T / n
    target = torch.linalg.inv(a + lam * torch.eye(n, dtype=D))
    v = torch.randn(n, generator=gen, dtype=D)
    s = target @ v
    fixed = target.clone()
    bfgs_inverse_update_(fixed, s, (a + lam * torch.eye(n, dtype=D)) @ s, torch.tensor(True))
    torch.testing.assert_close(fixed, target, rtol=1e-12, atol=1e-12)
    h = torch.eye(n, dtype=D)
    for _ in range(2000):
        v = torch.randn(n, generator=gen, dtype=D)
        s = h @ v
        bfgs_inverse_update_(h, s, a @ s + lam * s, torch.tensor(True))
    assert (h - target).abs().max() < 1e-10


def test_ok8_parameter_counts_of_paper_autoencoders():
    def count(sizes):
        return sum(sum(p.numel() for p in nn.Linear(i, o).parameters())
                   for i, o in zip(sizes[:-1], sizes[1:]))

    assert count([784, 1000, 500, 250, 30, 250, 500, 1000, 784]) == 2_837_314
    assert count([625, 2000, 1000, 500, 30, 500, 1000, 2000, 625]) == 7_537_655
    assert count([784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]) == 842_340


# ---------------------------------------------------------------- dense reference
def forward_stats(model, x, y):
    lins = [m for m in model if isinstance(m, nn.Linear)]
    acts, hs = [], []
    z = x
    for i, lin in enumerate(lins):
        a = torch.cat((z, torch.ones(len(x), 1, dtype=D)), 1)
        w = wtilde(lin).requires_grad_()
        h = a @ w.T
        h.retain_grad()
        acts.append((a.detach(), w))
        hs.append(h)
        z = torch.tanh(h) if i < len(lins) - 1 else h
    loss = F.cross_entropy(z, y)
    loss.backward()
    n = len(x)
    return float(loss.detach()), [(a, h.detach(), h.grad * n, w.grad.clone())
                         for (a, w), h in zip(acts, hs)]


def reference_run(model, data, lr, lam, rho=0.9, wd=1e-5, beta=0.9, c=0.9, mu1=0.2,
                  eps=1e-4, zero_a=False, wd_bias=None, history=None, period=1):
    """Dense float64 K-BFGS; with ``history=m`` K-BFGS(L): ``H_g`` rebuilt each step as the BFGS
    matrix of the last ``m`` accepted pairs applied to ``I`` (a list: ``m`` per layer, ``None``
    for full BFGS); with ``period=T`` only steps 0, T, 2T, ... (counting from 0) update ``A``,
    ``H_a`` and ``H_g`` and run the second pass."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    histories = history if isinstance(history, list) else [history] * len(lins)
    r = math.sqrt(lam)
    st = None
    losses = []
    for t, (x, y) in enumerate(data):
        curvature = t % period == 0
        loss, s1 = forward_stats(model, x, y)
        losses.append(loss)
        if st is None:
            st = []
            for a, h, _g, gw in s1:
                big_a = a.T @ a / len(a) * ((1 - beta) if zero_a else 1.0)
                st.append(dict(A=big_a, Ha=torch.linalg.inv(big_a + r * torch.eye(len(big_a),
                                                                                  dtype=D)),
                               Hg=torch.eye(h.shape[1], dtype=D), m=torch.zeros_like(gw),
                               sb=torch.zeros(h.shape[1], dtype=D), pairs=[],
                               yb=torch.zeros(h.shape[1], dtype=D)))
        elif curvature:
            for ls, (a, _, _, _) in zip(st, s1):
                ls["A"] = beta * ls["A"] + (1 - beta) * a.T @ a / len(a)
        for ls, lin, (_, _, _, gw) in zip(st, lins, s1):
            decay = wd * wtilde(lin)
            if wd_bias is not None:
                decay[:, -1] = wd_bias * lin.bias.detach()
            ls["m"] = rho * ls["m"] + (1 - rho) * (gw + decay)
            p = ls["Hg"] @ ls["m"] @ ls["Ha"]
            with torch.no_grad():
                lin.weight -= lr * p[:, :-1]
                lin.bias -= lr * p[:, -1]
        if not curvature:
            continue
        _, s2 = forward_stats(model, x, y)
        for ls, history, (a, h1, g1, _), (_, h2, g2, _) in zip(st, histories, s1, s2):
            s, yv = h2.mean(0) - h1.mean(0), g2.mean(0) - g1.mean(0)
            ls["sb"] = c * ls["sb"] + (1 - c) * s
            ls["yb"] = c * ls["yb"] + (1 - c) * yv
            s, yv = ls["sb"], ls["yb"]
            hy = ls["Hg"] @ yv
            if s @ yv < mu1 * (yv @ hy):
                th = (1 - mu1) * (yv @ hy) / (yv @ hy - s @ yv)
                s = th * s + (1 - th) * hy
            if s @ yv < r * (s @ s):
                th = (1 - r) * (s @ s) / (s @ s - s @ yv)
                yv = th * yv + (1 - th) * s
            if s @ yv > eps * (s @ s) * g1.mean(0).norm():
                if history:  # K-BFGS(L): BFGS from I through the last `history` pairs
                    ls["pairs"] = (ls["pairs"] + [(s, yv)])[-history:]
                    ls["Hg"] = torch.eye(len(s), dtype=D)
                    for sp, yp in ls["pairs"]:
                        ls["Hg"] = dense_bfgs(ls["Hg"], sp, yp)
                else:
                    ls["Hg"] = dense_bfgs(ls["Hg"], s, yv)
            v = a.mean(0)
            sa = ls["Ha"] @ v
            ya = (ls["A"] + r * torch.eye(len(v), dtype=D)) @ sa
            if sa @ ya > eps * (sa @ sa) * v.norm():
                ls["Ha"] = dense_bfgs(ls["Ha"], sa, ya)
    return losses, st


@pytest.mark.parametrize("period", [1, 3])
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_steps_match_dense_reference(cls, period):
    """Every step (the paper), and ``curvature_update_period=3``: steps 1, 4, 7 are full
    K-BFGS steps (two closure calls, every curvature update); the steps between call the
    closure once and move the parameters with the last ``H_g`` and ``H_a``."""
    data = batches(8)
    model, ref = mlp(3, (5, 6, 4, 3)), mlp(3, (5, 6, 4, 3))
    opt = cls(model, lr=0.5, damping=0.1, curvature_update_period=period)
    calls, losses = [], []
    for x, y in data:
        before = len(calls)
        losses.append(float(opt.step(make_closure(opt, model, x, y, calls))))
        calls[before:] = [len(calls) - before]
    assert calls == [2 if t % period == 0 else 1 for t in range(8)]
    ref_losses, ref_st = reference_run(ref, data, lr=0.5, lam=0.1, period=period)
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    for m, r in zip([m for m in model if isinstance(m, nn.Linear)],
                    [m for m in ref if isinstance(m, nn.Linear)]):
        torch.testing.assert_close(wtilde(m), wtilde(r), rtol=1e-10, atol=1e-12)
    for ls, rs in zip(opt.state["kbfgs"]["layers"], ref_st):
        torch.testing.assert_close(ls["H_a"], rs["Ha"], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(ls["A"], rs["A"])
        if cls is KBFGS:
            torch.testing.assert_close(ls["H_g"], rs["Hg"], rtol=1e-9, atol=1e-11)
    d = opt.diagnostics()
    assert d["g_pairs_accepted"] + d["g_pairs_rejected"] == 3 * len(range(0, 8, period))


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_bias_group_without_weight_decay_matches_dense_reference(cls):
    """Weight decay on the weights only (biases in a group with ``weight_decay=0``): the
    gradient average decays each column block of ``W̃`` with its own group's rate."""
    data = batches(3)
    model, ref = mlp(4, (5, 6, 3)), mlp(4, (5, 6, 3))
    biases = [m.bias for m in model if isinstance(m, nn.Linear)]
    opt = cls(model, lr=0.5, damping=0.1, weight_decay=0.2,
              param_groups=[{"params": biases, "weight_decay": 0.0}])
    losses = [float(opt.step(make_closure(opt, model, x, y)).detach()) for x, y in data]
    ref_losses, _ = reference_run(ref, data, lr=0.5, lam=0.1, wd=0.2, wd_bias=0.0)
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    for m, r in zip([m for m in model if isinstance(m, nn.Linear)],
                    [m for m in ref if isinstance(m, nn.Linear)]):
        torch.testing.assert_close(wtilde(m), wtilde(r), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_full_batch_zero_started_a_matches_dense_reference(cls):
    """``a_init="zero"``, ``pair_decay=0`` (the authors' full-batch mode): the A average starts
    at (1 − β)·statistic, H_a at its damped inverse; one batch repeated."""
    data = batches(1) * 4
    model, ref = mlp(5, (5, 6, 4, 3)), mlp(5, (5, 6, 4, 3))
    opt = cls(model, lr=0.5, damping=0.1, pair_decay=0.0, a_init="zero")
    losses = [float(opt.step(make_closure(opt, model, x, y)).detach()) for x, y in data]
    ref_losses, ref_st = reference_run(ref, data, lr=0.5, lam=0.1, c=0.0, zero_a=True)
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    for m, r in zip([m for m in model if isinstance(m, nn.Linear)],
                    [m for m in ref if isinstance(m, nn.Linear)]):
        torch.testing.assert_close(wtilde(m), wtilde(r), rtol=1e-10, atol=1e-12)
    for ls, rs in zip(opt.state["kbfgs"]["layers"], ref_st):
        torch.testing.assert_close(ls["A"], rs["A"])
        torch.testing.assert_close(ls["H_a"], rs["Ha"], rtol=1e-9, atol=1e-11)
    x = data[0][0]
    first = torch.cat((x, torch.ones(len(x), 1, dtype=D)), 1)
    # the input layer sees the same batch every step: A = (1 − 0.9⁴) · statistic
    torch.testing.assert_close(opt.state["kbfgs"]["layers"][0]["A"],
                               (1 - 0.9 ** 4) * first.T @ first / len(x))


@pytest.mark.parametrize("eps", [1e-4, 3.0])
def test_kbfgsl_matches_dense_lbfgs_after_the_history_wraps(eps):
    """History of 2 over 12 steps (pairs dropped from the ring every step after the second),
    layers of output widths 6, 4 and 3; with ``cautious_eps=3`` half the pairs are rejected too
    (none accepted in the last layer, six in the middle one), so each layer's ring holds a
    different set."""
    data = batches(12, seed=3)
    model, ref = mlp(6, (5, 6, 4, 3)), mlp(6, (5, 6, 4, 3))
    opt = KBFGSL(model, lr=0.5, damping=0.1, history_size=2, cautious_eps=eps)
    losses = [float(opt.step(make_closure(opt, model, x, y))) for x, y in data]
    ref_losses, ref_st = reference_run(ref, data, lr=0.5, lam=0.1, eps=eps, history=2)
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    for m, r in zip([m for m in model if isinstance(m, nn.Linear)],
                    [m for m in ref if isinstance(m, nn.Linear)]):
        torch.testing.assert_close(wtilde(m), wtilde(r), rtol=1e-9, atol=1e-11)
    d = opt.diagnostics()
    assert d["history_length"] == [len(rs["pairs"]) for rs in ref_st]
    assert d["g_pairs_accepted_per_layer"][0] == 12  # ten pairs dropped from the first ring
    if eps > 1:
        assert d["g_pairs_rejected"] > 0 and d["history_length"] == [2, 2, 0]


def test_kbfgsl_dense_hg_keeps_full_bfgs_in_layers_no_wider_than_the_history():
    """``dense_hg=True``, history of 2: the layers of output width 4 and 3 (≤ 2·2) keep a dense
    full-memory BFGS ``H_g`` (the reference's K-BFGS), the width-6 layer the ring (its L-BFGS),
    over 12 steps in which the rings would wrap ten times."""
    data = batches(12, seed=3)
    model, ref = mlp(6, (5, 6, 4, 3)), mlp(6, (5, 6, 4, 3))
    opt = KBFGSL(model, lr=0.5, damping=0.1, history_size=2, dense_hg=True)
    losses = [float(opt.step(make_closure(opt, model, x, y))) for x, y in data]
    ref_losses, ref_st = reference_run(ref, data, lr=0.5, lam=0.1, history=[2, None, None])
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    layers = opt.state["kbfgs"]["layers"]
    for ls, rs in zip(layers[1:], ref_st[1:]):
        torch.testing.assert_close(ls["H_g"], rs["Hg"], rtol=1e-9, atol=1e-11)
    for m, r in zip([m for m in model if isinstance(m, nn.Linear)],
                    [m for m in ref if isinstance(m, nn.Linear)]):
        torch.testing.assert_close(wtilde(m), wtilde(r), rtol=1e-9, atol=1e-11)
    d = opt.diagnostics()
    assert d["dense_hg_layers"] == opt.layer_names[1:]
    assert d["history_length"] == [2, None, None] and d["g_pairs_accepted"] == 36
    # a checkpoint of the paper's layout does not load into this one
    with pytest.raises(ValueError, match="optimizer options"):
        opt.load_state_dict(KBFGSL(mlp(6, (5, 6, 4, 3)), history_size=2).state_dict())


def test_warm_start_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    opt = KBFGS(model, lr=0.1)
    assert opt.warm_start([(x, y) for x, y in batches(3)]) == 3
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert opt.diagnostics()["warm_started"]


def test_kbfgsl_equals_kbfgs_below_capacity():
    data = batches(7, seed=5)
    m1, m2 = mlp(4), mlp(4)
    o1, o2 = KBFGS(m1, lr=0.3, damping=0.3), KBFGSL(m2, lr=0.3, damping=0.3, history_size=10)
    for x, y in data:
        o1.step(make_closure(o1, m1, x, y))
        o2.step(make_closure(o2, m2, x, y))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-10, atol=1e-12)
    assert o2.diagnostics()["history_length"] == o1.diagnostics()["g_pairs_accepted_per_layer"]


def test_ok4_output_layer_with_half_mse_keeps_hg_identity():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 4)).to(D)
    opt = KBFGS(model, lr=0.2, damping=0.3)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x = torch.randn(8, 4, generator=g, dtype=D)

        def closure(x=x):
            opt.zero_grad()
            loss = 0.5 * (model(x) - x).pow(2).sum(1).mean()
            loss.backward()
            return loss

        opt.step(closure)
    out = opt.state["kbfgs"]["layers"][1]
    torch.testing.assert_close(out["s_bar"], out["y_bar"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["H_g"], torch.eye(4, dtype=D), rtol=0, atol=1e-12)
    assert opt.diagnostics()["dd_step1_active_per_layer"][1] == 0
    assert opt.diagnostics()["dd_step2_active_per_layer"][1] == 0


def test_ok6_homogeneous_coordinate_after_warm_start_and_ema():
    model = mlp(1)
    data = batches(4, n=6)
    opt = KBFGS(model, lr=0.1)
    assert KBFGS(mlp(1)).warm_start(iter(data), max_batches=2) == 2
    with pytest.raises(ValueError, match="max_batches=0"):
        opt.warm_start(data, max_batches=0)
    assert opt.warm_start(data) == 4
    xs = torch.stack([x.mean(0) for x, _ in data]).mean(0)
    a = opt.state["kbfgs"]["layers"][0]["A"]
    assert float(a[-1, -1]) == pytest.approx(1.0, abs=1e-14)
    torch.testing.assert_close(a[-1, :-1], xs)
    want = sum(torch.cat((x, torch.ones(6, 1, dtype=D)), 1).T @
               torch.cat((x, torch.ones(6, 1, dtype=D)), 1) / 6 for x, _ in data) / 4
    torch.testing.assert_close(a, want)
    first = a.clone()
    for x, y in data[:2]:
        opt.step(make_closure(opt, model, x, y))
    a = opt.state["kbfgs"]["layers"][0]["A"]
    assert float(a[-1, -1]) == pytest.approx(1.0, abs=1e-14)
    # warm-started: the first step skips the EMA; the second applies it with β = 0.9
    x1 = data[1][0]
    ah = torch.cat((x1, torch.ones(6, 1, dtype=D)), 1)
    torch.testing.assert_close(a, 0.9 * first + 0.1 * ah.T @ ah / 6)


def test_ok7_cautious_skip_and_history_cap():
    model = mlp(2)
    opt = KBFGSL(model, lr=0.0, history_size=3)  # s = y = 0: every G pair is rejected
    for x, y in batches(3):
        opt.step(make_closure(opt, model, x, y))
    d = opt.diagnostics()
    assert d["g_pairs_accepted"] == 0 and d["g_pairs_rejected"] == 6
    assert d["history_length"] == [0, 0]
    opt2 = KBFGSL(mlp(2), lr=0.3, history_size=3)
    for x, y in batches(6):
        opt2.step(make_closure(opt2, opt2.model, x, y))
    d2 = opt2.diagnostics()
    assert d2["g_pairs_accepted"] >= 8
    assert max(d2["history_length"]) == 3
    assert KBFGSL(mlp()).history_size == 100


def test_non_finite_pair_is_rejected_and_counted():
    model = mlp(2)
    opt = KBFGS(model, lr=0.1)
    x, y = batches(1)[0]
    opt.step(make_closure(opt, model, x, y))
    before = [ls["H_g"].clone() for ls in opt.state["kbfgs"]["layers"]]
    sb = opt.state["kbfgs"]["layers"][0]["s_bar"].clone()
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        xx = x if len(calls) == 1 else x.clone().fill_(float("nan"))
        loss = F.cross_entropy(model(xx), y)
        loss.backward()
        return loss

    opt.step(closure)
    ls = opt.state["kbfgs"]["layers"]
    assert torch.equal(ls[0]["H_g"], before[0]) and torch.equal(ls[0]["s_bar"], sb)
    assert opt.diagnostics()["g_pairs_rejected_per_layer"] == [1, 1]


def test_closure_required_called_twice_returns_pass1_loss():
    model = mlp()
    opt = KBFGS(model)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    x, y = batches(1)[0]
    with torch.no_grad():
        want = float(F.cross_entropy(model(x), y))
    calls = []
    loss = opt.step(make_closure(opt, model, x, y, calls))
    assert len(calls) == 2
    assert float(loss.detach()) == want


def test_conv2d_pairs_use_spatial_means():
    torch.manual_seed(8)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(D)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 2)).to(D)
    x = torch.randn(5, 2, 4, 4, dtype=D)
    y = torch.randint(0, 2, (5,))
    opt = KBFGSL(model, lr=0.05, damping=0.3, pair_decay=0.0)
    snap = [p.detach().clone() for p in model.parameters()]

    def explicit(params):
        params = [p.detach().clone().requires_grad_() for p in params]
        w, b, lw, lb = params
        h = F.conv2d(x, w, b, padding=1)
        h.retain_grad()
        F.cross_entropy(F.linear(torch.tanh(h).flatten(1), lw, lb), y).backward()
        return h.detach(), h.grad * len(x)

    h1, g1 = explicit(snap)
    cols = F.unfold(x, 3, padding=1).transpose(1, 2)
    a = torch.cat((cols, torch.ones(5, 16, 1, dtype=D)), -1).reshape(-1, 19)
    opt.step(make_closure(opt, model, x, y))
    h2, g2 = explicit([p.detach() for p in model.parameters()])
    ls = opt.state["kbfgs"]["layers"][0]
    torch.testing.assert_close(ls["s_bar"], h2.mean(dim=(0, 2, 3)) - h1.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(ls["y_bar"], (g2 - g1).sum(dim=(2, 3)).mean(0))
    torch.testing.assert_close(ls["A"], a.T @ a / a.shape[0])


def test_second_pass_skips_parameter_gradients_and_keeps_pass1_grads():
    """Pass 2 computes no parameter gradient, even with a fallback layer first and an in-place
    ReLU; its pair statistics equal an explicit computation; after ``step`` every ``.grad`` is
    the pass-1 gradient (torch.func at θ_k) and every parameter requires grad again."""
    from torch.func import functional_call, grad

    torch.manual_seed(12)
    model = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 6), nn.ReLU(inplace=True),
                          nn.Linear(6, 3)).to(D)
    x, y = batches(1, n=8)[0]
    opt = KBFGS(model, lr=0.2, damping=0.3, pair_decay=0.0)
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}

    def explicit(params):
        params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        h1 = F.linear(F.layer_norm(x, (5,), params["0.weight"], params["0.bias"]),
                      params["1.weight"], params["1.bias"])
        h2 = F.linear(torch.relu(h1), params["3.weight"], params["3.bias"])
        h1.retain_grad()
        h2.retain_grad()
        F.cross_entropy(h2, y).backward()
        return [(h.detach().mean(0), h.grad.mean(0) * len(x)) for h in (h1, h2)]

    grads_none = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads_none.append([p.grad is None for p in model.parameters()])
        return loss

    opt.step(closure)
    assert grads_none == [[False] * 6, [True] * 6]
    want = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(theta0)
    for name, p in model.named_parameters():
        assert p.requires_grad
        torch.testing.assert_close(p.grad, want[name], rtol=1e-12, atol=1e-14)
    before = explicit(theta0)
    after = explicit(dict(model.named_parameters()))
    for ls, (h1, g1), (h2, g2) in zip(opt.state["kbfgs"]["layers"], before, after):
        torch.testing.assert_close(ls["s_bar"], h2 - h1, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ls["y_bar"], g2 - g1, rtol=1e-12, atol=1e-14)
    assert len(model[1]._forward_hooks) == 1  # only the capture hook remains


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_steady_state_steps_do_not_sync(cls):
    """After the first step, steps convert no tensor to a Python value (decisions stay on the
    device); the device-side counters still count every decision."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 6),
                          nn.LayerNorm(6), nn.Linear(6, 3)).to(D)
    x, y = torch.randn(6, 2, 4, 4, dtype=D), torch.randint(0, 3, (6,))
    opt = cls(model, lr=0.1, damping=0.3)
    opt.step(make_closure(opt, model, x, y))
    with no_host_sync():
        for _ in range(4):
            opt.step(make_closure(opt, model, x, y))
        with pytest.raises(AssertionError, match="host synchronisation"):
            bool(torch.ones(()))  # the guard is on
    d = opt.diagnostics()
    assert d["g_pairs_accepted"] + d["g_pairs_rejected"] == 5 * 3
    assert d["a_updates_accepted"] + d["a_updates_rejected"] == 5 * 3


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_both_passes_draw_the_same_dropout_masks(cls):
    """Pass 2 must see pass 1's minibatch and masks: the generators are set back in between;
    the next step draws new ones. ``step`` returns the pass-1 loss, detached."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3)).to(D)
    masks = []
    model[1].register_forward_hook(lambda m, inp, out: masks.append(out != 0))
    opt = cls(model, lr=0.1)
    x, y = batches(1, n=32)[0]
    for _ in range(3):
        loss = opt.step(make_closure(opt, model, x, y))
        assert not loss.requires_grad
    assert len(masks) == 6
    for k in range(3):
        assert torch.equal(masks[2 * k], masks[2 * k + 1])
    assert not torch.equal(masks[0], masks[2]) and not torch.equal(masks[2], masks[4])


def test_unsupported_layer_trains_with_ema_fallback():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    opt = KBFGS(model, lr=0.3, weight_decay=0.0)
    assert [g["kind"] for g in opt.param_groups] == ["kronecker", "fallback"]
    norm = model[1]
    x, y = batches(1, n=32)[0]
    losses = [float(opt.step(make_closure(opt, model, x, y)).detach()) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]
    # the fallback rule on one step: θ ← θ − lr (0.9 ĝ + 0.1 ∇), ∇ the pass-1 gradient
    ema = [b.clone() for b in opt.state["kbfgs"]["fallback"]]
    snap = [p.detach().clone() for p in norm.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in norm.parameters()]
    opt.step(make_closure(opt, model, x, y))
    for p, b, g, p0 in zip(norm.parameters(), ema, grads, snap):
        torch.testing.assert_close(p.detach(), p0 - 0.3 * (0.9 * b + 0.1 * g))


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_exact_resume_into_fresh_model(cls):
    data = batches(7)
    kw = dict(lr=0.3, damping=0.2)
    if cls is KBFGSL:
        kw["history_size"] = 3
    m_full = mlp(7)
    o_full = cls(m_full, **kw)
    o_full.warm_start(data[:2])
    full = [float(o_full.step(make_closure(o_full, m_full, x, y)).detach()) for x, y in data]
    m_a = mlp(7)
    o_a = cls(m_a, **kw)
    o_a.warm_start(data[:2])
    for x, y in data[:4]:
        o_a.step(make_closure(o_a, m_a, x, y))
    buf = io.BytesIO()
    torch.save({"model": m_a.state_dict(), "opt": o_a.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m_b = mlp(99)
    m_b.load_state_dict(ck["model"])
    o_b = cls(m_b, **kw)
    o_b.load_state_dict(ck["opt"])
    rest = [float(o_b.step(make_closure(o_b, m_b, x, y)).detach()) for x, y in data[4:]]
    assert rest == full[4:]
    for p1, p2 in zip(m_full.parameters(), m_b.parameters()):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("kw, name", [
    (dict(lr=-0.1), "lr=-0.1"), (dict(damping=0), "damping=0"),
    (dict(momentum=1.0), "momentum=1.0"), (dict(stat_decay=-0.1), "stat_decay=-0.1"),
    (dict(pair_decay=1), "pair_decay=1"), (dict(mu1=0.0), "mu1=0.0"),
    (dict(weight_decay=float("nan")), "weight_decay=nan"),
    (dict(a_init="ones"), "a_init='ones'"),
])
def test_bad_arguments(kw, name):
    for cls in (KBFGS, KBFGSL):
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            cls(mlp(), **kw)
    with pytest.raises(ValueError, match="history_size=0"):
        KBFGSL(mlp(), history_size=0)
    with pytest.raises(ValueError, match="dense_hg='yes'"):
        KBFGSL(mlp(), dense_hg="yes")
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"curvature_update_period={bad}"):
            KBFGS(mlp(), curvature_update_period=bad)
    with pytest.raises(ValueError, match="model="):
        KBFGS(list(mlp().parameters()))


# ---------------------------------------------------------------- convergence (CURVES-like)
def curves_like(n, side=16, seed=0):
    """CURVES-like images (our own generator, not the original file): a smooth curve through 3
    random points (quadratic through them at t = 0, ½, 1), rendered with a Gaussian pen."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 3, 2, generator=g) * 0.8 + 0.1
    t = torch.linspace(0, 1, 64)[None, :, None]
    curve = (2 * (t - 0.5) * (t - 1) * pts[:, None, 0] - 4 * t * (t - 1) * pts[:, None, 1]
             + 2 * t * (t - 0.5) * pts[:, None, 2])  # [n, 64, 2]
    c = (torch.arange(side) + 0.5) / side
    grid = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    d2 = ((grid[None, :, None] - curve[:, None]) ** 2).sum(-1).min(-1).values
    return torch.exp(-d2 / (2 * (0.7 / side) ** 2))


def small_autoencoder():
    torch.manual_seed(0)
    s = [256, 128, 32, 8, 32, 128, 256]
    layers = []
    for i in range(len(s) - 1):
        layers.append(nn.Linear(s[i], s[i + 1]))
        if i not in (2, len(s) - 2):  # linear code and output layers, as the paper
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train_loss(make_opt, data, epochs=5, batch=50):
    model = small_autoencoder()
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(1)

    def bce(xb):
        return F.binary_cross_entropy_with_logits(model(xb), xb, reduction="sum") / len(xb)

    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), batch):
            xb = data[perm[i:i + batch]]

            def closure(xb=xb):
                opt.zero_grad()
                loss = bce(xb)
                loss.backward()
                return loss

            opt.step(closure)
    with torch.no_grad():
        loss = bce(data)
    return float(loss) if math.isfinite(float(loss)) else float("inf")


def test_kbfgs_and_kfac_beat_adam_on_curves_like_autoencoder():
    """Same model, data, batches and epochs; each method with its best LR from a small grid
    (damping and the other settings fixed; K-FAC with statistics and inverses every step)."""
    from secant import KFAC

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: one thread is faster on a shared 2-core machine
    try:
        _compare_on_curves(KFAC)
    finally:
        torch.set_num_threads(threads)


def _compare_on_curves(KFAC):
    data = curves_like(1000)
    adam = min(train_loss(lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr=lr), data)
               for lr in (3e-3, 1e-2, 3e-2))
    kbfgs = min(train_loss(lambda m, lr=lr: KBFGS(m, lr=lr, damping=0.3), data)
                for lr in (0.2, 0.3, 0.5))
    kfac = min(train_loss(lambda m, lr=lr: KFAC(
        m, lr=lr, damping=0.3, momentum=0.5, factor_update_period=1, inverse_update_period=1,
        kl_clip=None, inverse_method="cholesky"), data) for lr in (0.1, 0.3))
    assert kbfgs < adam and kfac < adam, (kbfgs, kfac, adam)


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_channels_last_conv_trains_as_contiguous(cls):
    """A weight that is not contiguous gets its step through a buffer, in its own layout."""
    def model():
        torch.manual_seed(4)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                             nn.Linear(3 * 16, 2)).to(D)
    x = torch.randn(6, 2, 4, 4, dtype=D)
    y = torch.randint(0, 2, (6,))
    plain, last = model(), model().to(memory_format=torch.channels_last)
    assert not last[0].weight.is_contiguous()
    for m in (plain, last):
        opt = cls(m, lr=0.1)
        for _ in range(3):
            opt.step(make_closure(opt, m, x, y))
    assert last[0].weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(last.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)



@pytest.mark.parametrize("cls, kw", [(KBFGS, {}), (KBFGSL, dict(history_size=2))])
def test_compiled_pair_updates_equal_eager_and_compile_once(cls, kw):
    """``compile=backend``: steps 4–6 of each layer stack are one graph (``fullgraph``: a graph
    break would raise), built in the first step and never again over 10 steps with an LR
    schedule; iterates and counters equal the eager ones. K-BFGS(L) with a ring of 2 has a
    stack with the compact form and one with the dense matrix (two graphs); a compiled
    optimizer deep-copies and pickles, and the copy steps alike."""
    data = batches(10)
    runs = []
    for backend in (False, COUNTING):
        GRAPHS.clear()
        model = mlp(6, (5, 6, 4, 3))
        opt = cls(model, lr=0.3, damping=0.1, compile=backend, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        built_at = []
        for k, (x, y) in enumerate(data):
            before = len(GRAPHS)
            opt.step(make_closure(opt, model, x, y))
            sched.step()
            if len(GRAPHS) > before:
                built_at.append(k)
        runs.append((model, opt, built_at))
    (m0, o0, _), (m1, o1, built_at) = runs
    assert built_at == [0] and len(GRAPHS) == len(o1._stacks) == (2 if cls is KBFGSL else 1)
    for p, q in zip(m0.parameters(), m1.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)
    d0, d1 = o0.diagnostics(), o1.diagnostics()
    for key in ("g_pairs_accepted_per_layer", "dd_step1_active_per_layer",
                "a_updates_accepted_per_layer"):
        assert d0[key] == d1[key], key
    x, y = data[0]
    for copied in (copy.deepcopy(o1), pickle.loads(pickle.dumps(o1))):
        twin = copied.model
        assert copied.compile == COUNTING and not hasattr(copied,
                                                                             "_compiled_fns")
        copied.step(make_closure(copied, twin, x, y))
        with torch.no_grad():
            ref = copy.deepcopy(o0)
            ref.step(make_closure(ref, ref.model, x, y))
        for p, q in zip(ref.model.parameters(), twin.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


def test_compiled_graphs_are_per_stack_however_many_stacks_and_optimizers():
    """Twelve stacks (one layer per parameter group), in two optimizers of one process: each
    stack compiles its own graph once (dynamo's limit of 8 graphs per code object, which
    ``fullgraph`` turns into an error, never applies)."""
    widths = (5, 6, 7, 6, 5, 4, 3)
    data = batches(3)
    GRAPHS.clear()
    for seed in (0, 1):
        model = mlp(seed, widths)
        layers = [m for m in model if isinstance(m, nn.Linear)]
        groups = [{"modules": [m], "lr": 0.1 + 0.01 * k} for k, m in enumerate(layers)]
        opt = KBFGS(model, lr=0.1, param_groups=groups, compile=COUNTING)
        assert len(opt._stacks) == 6
        for x, y in data:
            opt.step(make_closure(opt, model, x, y))
    assert len(GRAPHS) == 12


def test_compile_option_is_checked():
    with pytest.raises(ValueError, match="compile='no-such-backend'"):
        KBFGS(mlp(), compile="no-such-backend")
