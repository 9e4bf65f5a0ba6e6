"""MomentumLBFGS against independent references: torch.optim.SGD (O-M8), a dense float64
re-implementation of the clean algorithm (O-M6), exact quadratic secants (O-M4)."""

import io

import pytest
import torch
from counting_backend import GRAPHS
from counting_backend import NAME as COUNTING
from torch import nn

from secant import MomentumLBFGS


def quadratic(n=12, cond=1e3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    a = q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n,
                                      dtype=dtype)) @ q.T / cond
    b = torch.randn(n, generator=gen, dtype=dtype)
    return a, b


def split_params(n, sizes, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=dtype)
    return [nn.Parameter(c.clone()) for c in torch.split(x, sizes)]


def set_quadratic_grads(params, a, b, noise=None):
    x = torch.cat([p.detach() for p in params])
    g = a @ x - b
    if noise is not None:
        g = g + noise
    for p, gp in zip(params, torch.split(g, [p.numel() for p in params])):
        p.grad = gp.clone()


# ---------------------------------------------------------------- O-M8
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_warmup_equals_sgd_with_momentum(wd):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    ref.load_state_dict(net.state_dict())
    groups = lambda m: [{"params": m[0].parameters(), "lr": 0.05},  # noqa: E731
                        {"params": m[2].parameters()}]
    T = 6
    opt = MomentumLBFGS(groups(net), lr=0.1, momentum=0.9, weight_decay=wd, update_period=T)
    sgd = torch.optim.SGD(groups(ref), lr=0.1, momentum=0.9, weight_decay=wd)
    x, y = torch.randn(32, 5), torch.randn(32, 3)
    for _ in range(2 * T - 1):
        for m, o in ((net, opt), (ref, sgd)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt.diagnostics()["pairs_accepted"] == 0


# ---------------------------------------------------------------- O-M6 reference
def reference_mlbfgs(x0, blocks, grad_fn, steps, lr, mu, beta, T, m, sigma_l, sigma_h, tau0,
                     step_rule, trace=None):
    """Dense float64 mL-BFGS (clean form): per-block dense BFGS matrices from γI. ``trace``
    (a dict) gets each block's gradient, direction ``H g``, pairs and γ of the last step."""
    x = x0.clone()
    u = torch.zeros_like(x)
    idx = [torch.arange(s, e) for s, e in blocks]
    pairs = [[] for _ in blocks]
    mx = mg = px = pg = None
    for t in range(1, steps + 1):
        g = grad_fn(x, t)
        mx = x.clone() if t == 1 else beta * mx + (1 - beta) * x
        mg = g.clone() if t == 1 else beta * mg + (1 - beta) * g
        if t % T == 0:
            if t >= 2 * T:
                for b, ib in enumerate(idx):
                    s, y = (mx - px)[ib], (mg - pg)[ib]
                    r = (s @ y) / (s @ s)
                    tau = 1.0
                    if r < sigma_l:
                        tau = (1 - sigma_l) / (1 - r)
                    elif r > sigma_h:
                        tau = (sigma_h - 1) / (r - 1)
                    tau = min(tau, tau0)
                    pairs[b] = (pairs[b] + [(s, tau * y + (1 - tau) * s)])[-m:]
            px, pg = mx.clone(), mg.clone()
        d = g.clone()
        if t >= 2 * T:
            for b, ib in enumerate(idx):
                if not pairs[b]:
                    continue
                s_n, y_n = pairs[b][-1]
                h = (s_n @ y_n) / (y_n @ y_n) * torch.eye(len(ib), dtype=x.dtype)
                for s, y in pairs[b]:
                    rho = 1 / (s @ y)
                    left = torch.eye(len(ib), dtype=x.dtype) - rho * torch.outer(s, y)
                    h = left @ h @ left.T + rho * torch.outer(s, s)
                d[ib] = h @ g[ib]
                if trace is not None:
                    trace[b] = (g[ib], d[ib], pairs[b], (s_n @ y_n) / (y_n @ y_n))
            if step_rule == "grad_norm":
                d = d * (g.norm() / d.norm())
        u = mu * u + d
        x = x - lr * u
    return x


@pytest.mark.parametrize("blocks,step_rule", [("group", "none"), ("tensor", "none"),
                                              ("tensor", "grad_norm")])
def test_matches_dense_reference(blocks, step_rule):
    """O-M6: one block == full-model L-BFGS; several blocks == per-block L-BFGS."""
    n, sizes = 12, [5, 4, 3]
    a, b = quadratic(n)
    gen = torch.Generator().manual_seed(7)
    noise = [0.05 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(60)]
    params = split_params(n, sizes)
    x0 = torch.cat([p.detach() for p in params])
    hp = dict(lr=0.5, momentum=0.5, beta=0.8, update_period=3, history_size=4)
    opt = MomentumLBFGS(params, **hp, blocks=blocks, step_rule=step_rule, chunk_size=2)
    for t in range(60):
        set_quadratic_grads(params, a, b, noise[t])
        opt.step()
    bounds = [(0, n)] if blocks == "group" else [(0, 5), (5, 9), (9, 12)]
    ref = reference_mlbfgs(x0, bounds, lambda x, t: a @ x - b + noise[t - 1], 60,
                           hp["lr"], hp["momentum"], hp["beta"], hp["update_period"],
                           hp["history_size"], 0.01, 1.5, 0.99, step_rule)
    torch.testing.assert_close(torch.cat([p.detach() for p in params]), ref, rtol=1e-9,
                               atol=1e-10)
    assert opt.diagnostics()["pairs_accepted"] > 0


def test_curvature_diagnostics_match_dense_computation():
    """The turn (cosine, norm ratio of H g to g) and the history's spectrum (γ, Rayleigh
    quotients, span of the s vectors) per block, against the dense reference's last step."""
    n, sizes = 12, [5, 4, 3]
    a, b = quadratic(n, cond=1e2)
    gen = torch.Generator().manual_seed(3)
    noise = [0.05 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(40)]
    params = split_params(n, sizes)
    x0 = torch.cat([p.detach() for p in params])
    hp = dict(lr=0.3, momentum=0.5, beta=0.8, update_period=3, history_size=4)
    opt = MomentumLBFGS(params, **hp, blocks="tensor", step_rule="none", chunk_size=2)
    for t in range(40):
        set_quadratic_grads(params, a, b, noise[t])
        opt.step()
    trace = {}
    reference_mlbfgs(x0, [(0, 5), (5, 9), (9, 12)], lambda x, t: a @ x - b + noise[t - 1], 40,
                     hp["lr"], hp["momentum"], hp["beta"], hp["update_period"],
                     hp["history_size"], 0.01, 1.5, 0.99, "none", trace)
    diag = opt.diagnostics()
    for blk, (g, d, pairs, gamma) in trace.items():
        s = torch.stack([p[0] for p in pairs])
        cos = torch.nn.functional.normalize(s, dim=1) @ torch.nn.functional.normalize(s, dim=1).T
        lam = torch.linalg.eigvalsh(cos).clamp(min=0)
        rq = [float(sp @ yp / (sp @ sp)) for sp, yp in pairs]
        want = {"direction_cosine": float(g @ d / (g.norm() * d.norm())),
                "direction_norm_ratio": float(d.norm() / g.norm()), "gamma": float(gamma),
                "curvature_min": min(rq), "curvature_max": max(rq),
                "pair_span": float(lam.sum() ** 2 / (lam**2).sum())}
        for key, value in want.items():
            assert diag[key + "_per_block"][blk] == pytest.approx(value, rel=1e-8), key
    g_all = torch.cat([t[0] for t in trace.values()])
    d_all = torch.cat([t[1] for t in trace.values()])
    assert diag["direction_cosine"] == pytest.approx(
        float(g_all @ d_all / (g_all.norm() * d_all.norm())), rel=1e-8)
    assert len(trace) == 3 and diag["history_length"] == [4, 4, 4]
    # the τ-rule keeps the quotients in [σ_L, σ_H] = [0.01, 1.5]
    assert min(diag["curvature_min_per_block"]) >= 0.01 - 1e-12
    assert max(diag["curvature_max_per_block"]) <= 1.5 + 1e-12


# ---------------------------------------------------------------- O-M4
@pytest.mark.parametrize("normalized,reset,exact", [(True, False, True), (False, True, False)])
def test_momentum_pairs_are_exact_secants(normalized, reset, exact):
    """Clean EMAs keep Mg = A·Mθ − b for any trajectory, so stored y = A s exactly (undamped
    settings); the released code's un-normalised, reset EMAs do not."""
    n = 8
    a, b = quadratic(n, cond=10.0)
    params = split_params(n, [n])
    opt = MomentumLBFGS(params, lr=0.3, beta=0.7, update_period=2, history_size=5,
                        damping=0.0, sigma_low=0.0, sigma_high=1e12, step_rule="none",
                        ema_normalized=normalized, grad_ema_reset=reset)
    gen = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(20):
        set_quadratic_grads(params, a, b)
        opt.step()
        with torch.no_grad():  # a noisy trajectory: perturb the weights between steps
            params[0].add_(0.01 * torch.randn(n, generator=gen, dtype=torch.float64))
        st = opt.state["mlbfgs"]
        mx, mg = st["param_ema"].reshape(-1)[:n], st["grad_ema"].reshape(-1)[:n]
        worst = max(worst, float((mg - (a @ mx - b)).abs().max()))
    st = opt.state["mlbfgs"]
    count = int(st["count"][0])
    assert count == 5
    z = st["history"][0]  # single chunk: [2m, c]
    for j in range(count):
        s, y = z[j, :n], z[5 + j, :n]
        err = float((y - a @ s).norm() / (a @ s).norm())
        assert (err < 1e-10) == exact
    assert (worst < 1e-12) == exact


# ---------------------------------------------------------------- resume
def make_run(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    return net


def train(net, opt, steps, start):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(16, 6, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), x[:, :2].sin()).backward()
        opt.step()


@pytest.mark.parametrize("kw", [{}, {"step_rule": "kl_clip", "pair_momentum": 0.5},
                                {"ema_normalized": False, "grad_ema_reset": True}])
def test_state_dict_resume_is_exact(kw):
    hp = dict(lr=0.05, update_period=3, history_size=3, beta=0.9, weight_decay=1e-3, **kw)
    full = make_run()
    opt = MomentumLBFGS(full.parameters(), **hp)
    train(full, opt, 25, 0)

    part = make_run()
    opt1 = MomentumLBFGS(part.parameters(), **hp)
    train(part, opt1, 11, 0)
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = make_run(seed=123)
    fresh.load_state_dict(ckpt["model"])
    opt2 = MomentumLBFGS(fresh.parameters(), **hp)
    opt2.load_state_dict(ckpt["opt"])
    train(fresh, opt2, 14, 11)
    for p, q in zip(full.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert opt2.diagnostics()["pairs_accepted"] == opt.diagnostics()["pairs_accepted"] > 0


def test_load_rejects_mismatched_state():
    net = make_run()
    opt = MomentumLBFGS(net.parameters(), history_size=3)
    other = MomentumLBFGS(make_run().parameters(), history_size=4)
    with pytest.raises(ValueError, match="history"):
        other.load_state_dict(opt.state_dict())


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("kw,name", [
    ({"lr": -1.0}, "lr"), ({"history_size": 0}, "history_size"),
    ({"update_period": 0}, "update_period"), ({"beta": 1.0}, "beta"), ({"beta": -0.1}, "beta"),
    ({"sigma_low": 1.0}, "sigma_low"), ({"sigma_high": 1.0}, "sigma_high"),
    ({"momentum": 1.0}, "momentum"), ({"weight_decay": -1e-3}, "weight_decay"),
    ({"damping": 1.0}, "damping"), ({"step_rule": "clip"}, "step_rule"),
    ({"blocks": "layer"}, "blocks"), ({"kl_clip": 0.0}, "kl_clip"),
    ({"pair_momentum": 1.0}, "pair_momentum"), ({"compile": "no-such-backend"}, "compile"),
])
def test_bad_arguments_raise(kw, name):
    with pytest.raises(ValueError, match=name):
        MomentumLBFGS(make_run().parameters(), **kw)


def test_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        MomentumLBFGS([nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3).double())])


def test_blocks_are_disjoint_known_and_stay_in_a_group():
    net = make_run()
    ps = list(net.parameters())
    with pytest.raises(ValueError, match="twice"):
        MomentumLBFGS(ps, blocks=[ps[:2], ps[1:]])
    with pytest.raises(ValueError, match="not in the optimizer"):
        MomentumLBFGS(ps[:2], blocks=[ps[:3]])
    with pytest.raises(ValueError, match="group"):
        MomentumLBFGS([{"params": ps[:2]}, {"params": ps[2:]}], blocks=[ps[1:3], ps[:1], ps[3:]])
    MomentumLBFGS(ps, blocks=[ps[:2], ps[2:]])


# ---------------------------------------------------------------- robustness
def test_nonfinite_gradient_is_skipped_and_state_kept():
    net = make_run()
    opt = MomentumLBFGS(net.parameters(), lr=0.05, update_period=2, history_size=3, beta=0.9)
    train(net, opt, 9, 0)
    before = [p.detach().clone() for p in net.parameters()]
    state = {k: v.clone() for k, v in opt.state["mlbfgs"].items()
             if torch.is_tensor(v) and k != "skipped_steps"}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    next(net.parameters()).grad[0, 0] = float("nan")
    opt.step()
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p, q)
    for k, v in state.items():
        assert torch.equal(opt.state["mlbfgs"][k], v), k
    diag = opt.diagnostics()
    assert diag["skipped_steps"] == 1 and diag["step"] == 9
    train(net, opt, 5, 9)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert opt.diagnostics()["step"] == 14


def test_degenerate_pair_is_rejected_per_block():
    """A block that does not move (lr = 0) gives s = 0: its pairs are rejected and counted."""
    net = make_run()
    ps = list(net.parameters())
    opt = MomentumLBFGS([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.0}], lr=0.05,
                        update_period=2, history_size=3, beta=0.5, blocks="group")
    train(net, opt, 12, 0)
    d = opt.diagnostics()
    assert d["pairs_accepted_per_block"] == [5, 0]
    assert d["pairs_rejected_per_block"] == [0, 5]
    assert d["history_length"] == [3, 0]


def test_params_without_grad_are_untouched():
    net = make_run()
    opt = MomentumLBFGS(net.parameters(), lr=0.1, update_period=2)
    frozen = net[2].weight.detach().clone()
    for _ in range(8):
        opt.zero_grad()
        net(torch.randn(4, 6)).sum().backward()
        net[2].weight.grad = None
        opt.step()
    assert torch.equal(net[2].weight, frozen)


def test_lr_scheduler_drives_the_step():
    torch.manual_seed(0)
    net, ref = make_run(), make_run()
    opt = MomentumLBFGS(net.parameters(), lr=0.1, update_period=50)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt, sgd)]
    for t in range(10):
        for m, o in ((net, opt), (ref, sgd)):
            o.zero_grad()
            m(torch.ones(2, 6) * t).square().mean().backward()
            o.step()
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_closure_is_called_and_loss_returned():
    net = make_run()
    opt = MomentumLBFGS(net.parameters())
    x = torch.randn(4, 6)

    def closure():
        opt.zero_grad()
        loss = net(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.ndim == 0
    assert opt.diagnostics()["last_step_norm"] > 0


# ---------------------------------------------------------------- convergence
def _noisy_lsq_loss(make_opt, lr, steps=300, seed=0):
    """Noisy least squares, Hessian condition number 1e4, every direction mattering equally."""
    gen = torch.Generator().manual_seed(seed)
    n = 20
    scales = torch.logspace(-2, 0, n)
    x = torch.randn(2048, n, generator=gen) * scales
    y = x @ (torch.randn(n, generator=gen) / scales) + 0.1 * torch.randn(2048, generator=gen)
    w = torch.zeros(n, requires_grad=True)
    opt = make_opt([w], lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        (0.5 * (x[idx] @ w - y[idx]).square().mean()).backward()
        opt.step()
    with torch.no_grad():
        loss = float(0.5 * (x @ w - y).square().mean())
    return loss if loss == loss else float("inf")


def test_beats_tuned_sgd_on_noisy_ill_conditioned_quadratic():
    grid = (1.0, 2.0)
    sgd = min(_noisy_lsq_loss(lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), lr)
              for lr in grid)
    mlbfgs = min(_noisy_lsq_loss(
        lambda p, lr: MomentumLBFGS(p, lr=lr, momentum=0.9, beta=0.9, update_period=20), lr)
        for lr in grid)
    assert mlbfgs < 0.5 * sgd, (mlbfgs, sgd)


# ---------------------------------------------------------------- no host synchronisation
def test_steady_state_step_never_reads_a_tensor_on_the_host(monkeypatch):
    """After curvature has started, step() (every step rule, a skipped step included) never
    converts a tensor to a Python value."""
    for rule in ("grad_norm", "unit", "kl_clip", "none"):
        net = make_run()
        opt = MomentumLBFGS(net.parameters(), lr=0.02, update_period=2, history_size=3,
                            beta=0.9, weight_decay=1e-3, step_rule=rule, pair_momentum=0.5,
                            blocks=[[net[0].weight, net[0].bias]])
        train(net, opt, 6, 0)
        with monkeypatch.context() as mp:
            def refuse(*args, **kwargs):
                raise AssertionError("host synchronisation in step()")
            for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
                mp.setattr(torch.Tensor, name, refuse)
            train(net, opt, 5, 6)
            for p in net.parameters():
                p.grad.fill_(float("inf"))
            opt.step()
        diag = opt.diagnostics()
        assert diag["skipped_steps"] == 1 and diag["step"] == 11
        assert diag["pairs_accepted"] > 0


# ---------------------------------------------------------------- dtypes, AMP, groups
def test_half_parameters_keep_float32_curvature():
    for dtype in (torch.bfloat16, torch.float16):
        net, ref = make_run(), make_run()
        net.to(dtype)
        opt = MomentumLBFGS(net.parameters(), lr=0.05, update_period=2, history_size=3,
                            beta=0.9)
        ref_opt = MomentumLBFGS(ref.parameters(), lr=0.05, update_period=2, history_size=3,
                                beta=0.9)
        for t in range(12):
            x = torch.randn(16, 6, generator=torch.Generator().manual_seed(t))
            for m, o, xx in ((net, opt, x.to(dtype)), (ref, ref_opt, x)):
                o.zero_grad()
                nn.functional.mse_loss(m(xx).float(), x[:, :2].sin()).backward()
                o.step()
        st = opt.state["mlbfgs"]
        assert st["history"].dtype == st["momentum_buffer"].dtype == torch.float32
        assert all(p.dtype == dtype for p in net.parameters())
        assert opt.diagnostics()["pairs_accepted"] > 0
        for p, q in zip(net.parameters(), ref.parameters()):  # follows the float32 run
            torch.testing.assert_close(p.float(), q.detach(), rtol=0.05, atol=0.05)


def test_grad_scaler_skips_overflowing_steps_without_touching_state():
    """float32 parameters, float16 autocast on the CPU: the first, overflowing steps are
    skipped by the scaler and the run goes on."""
    net = make_run()
    opt = MomentumLBFGS(net.parameters(), lr=0.05, update_period=2, history_size=3, beta=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)  # float16 backward overflows
    losses = []
    for t in range(30):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(t % 4))
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(net(x).float(), x[:, :2].sin())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    assert scaler.get_scale() < 2.0**30  # some steps were skipped by the scaler
    st = opt.state["mlbfgs"]
    assert all(bool(torch.isfinite(st[k]).all()) for k in ("param_ema", "grad_ema", "history"))
    assert opt.diagnostics()["pairs_accepted"] > 0
    assert losses[-1] < losses[0]


def test_add_param_group_gives_new_blocks_and_keeps_old_state():
    torch.manual_seed(0)
    net = make_run().double()
    old, new = list(net[0].parameters()), list(net[2].parameters())
    hp = dict(lr=0.05, update_period=3, history_size=3, beta=0.9, step_rule="none",
              weight_decay=1e-3, blocks="tensor")
    opt = MomentumLBFGS(old, **hp)
    twin_old = [nn.Parameter(p.detach().clone()) for p in old]
    twin = MomentumLBFGS(twin_old, **hp)  # never sees the new group
    sgd_new = [nn.Parameter(p.detach().clone()) for p in new]
    sgd = torch.optim.SGD(sgd_new, lr=0.2, momentum=0.5, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(5)
    grads = lambda ps: [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps]  # noqa: E731

    for _ in range(10):
        for p, q, g in zip(old, twin_old, grads(old)):
            p.grad, q.grad = g, g.clone()
        opt.step()
        twin.step()
    opt.add_param_group({"params": new, "lr": 0.2, "momentum": 0.5})
    for _ in range(4):  # block-diagonal, step_rule="none": the old blocks do not notice
        for p, q, g in zip(old, twin_old, grads(old)):
            p.grad, q.grad = g, g.clone()
        for p, q, g in zip(new, sgd_new, grads(new)):
            p.grad, q.grad = g, g.clone()
        for o in (opt, twin, sgd):
            o.step()
    for p, q in zip(old + new, twin_old + sgd_new):  # new blocks: SGD until their first pair
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
    diag = opt.diagnostics()
    assert len(diag["history_length"]) == 4 and diag["history_length"][2:] == [0, 0]
    assert diag["history_length"][:2] == [3, 3]
    for p, g in zip(old + new, grads(old + new)):
        p.grad = g
    opt.step()  # two update periods after joining: the new blocks' first pair
    assert opt.diagnostics()["history_length"][2:] == [1, 1]

    buf = io.BytesIO()  # resume after add_param_group: rebuild the groups, then load
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = MomentumLBFGS([nn.Parameter(p.detach().clone()) for p in old], **hp)
    other.add_param_group({"params": [nn.Parameter(p.detach().clone()) for p in new],
                           "lr": 0.2, "momentum": 0.5})
    other.load_state_dict(torch.load(buf, weights_only=True))
    for key, v in opt.state["mlbfgs"].items():
        if torch.is_tensor(v):
            assert torch.equal(other.state["mlbfgs"][key], v), key



def _two_group_run(compile, kw, steps=30):
    """A float64 MLP in two groups (update period 3, ring of 2), an LR scheduler, gradients
    alternately replaced and overwritten, a non-finite gradient at step 10; returns the final
    parameters and the steps at which a graph was compiled."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    opt = MomentumLBFGS([{"params": net[0].parameters()},
                         {"params": net[2].parameters(), "lr": 0.05, "weight_decay": 1e-3}],
                        lr=0.1, update_period=3, history_size=2, compile=compile, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    x, y = torch.randn(32, 5, dtype=torch.double), torch.randn(32, 3, dtype=torch.double)
    compiled_at = []
    for k in range(1, steps + 1):
        opt.zero_grad(set_to_none=k % 2 == 0)
        nn.functional.mse_loss(net(x), y).backward()
        if k == 10:
            net[0].weight.grad[0, 0] = float("nan")
        before = len(GRAPHS)
        opt.step()
        sched.step()
        if len(GRAPHS) > before:
            compiled_at.append(k)
    assert opt.diagnostics()["skipped_steps"] == 1
    return torch.cat([p.detach().flatten() for p in net.parameters()]), compiled_at


@pytest.mark.parametrize("kw", [{}, {"step_rule": "kl_clip", "blocks": "tensor",
                                     "pair_momentum": 0.5}])
def test_compiled_step_equals_eager_and_compiles_each_kind_of_step_once(kw):
    """``compile=backend``: the step's math is one graph (``fullgraph``: a graph break would
    raise) per kind of step — before any curvature (step 1), a snapshot (3), a pair with the
    first curvature step (6), a curvature step (7) — never rebuilt across 30 steps with a
    decaying learning rate, a skipped step and ``zero_grad`` both ways; the iterates equal
    eager's."""
    eager, _ = _two_group_run(False, kw)
    compiled, compiled_at = _two_group_run(COUNTING, kw)
    assert compiled_at == [1, 3, 6, 7]
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)


def test_compile_is_refused_with_a_process_group():
    """Block sharding over a process group puts collectives inside the step: refused at
    construction, naming ``compile``."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="compile"):
            MomentumLBFGS(make_run().parameters(), compile="eager",
                          process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
