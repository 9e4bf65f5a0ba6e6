"""Neumann optimizer: oracles O-N1..O-N5 (docs/neumann.md) and the optimizer contract.

References are independent of the optimizer code: dense float64 matrix powers (O-N1),
torch.optim.SGD (Nesterov / burn-in), autograd for the regulariser gradient, and a plain
flat-vector transcription of Algorithm 2 (docs/neumann.md) with the documented decisions.
"""

import io
import math
import pickle

import pytest
import torch
from counting_backend import GRAPHS
from counting_backend import NAME as COUNTING

from secant import Neumann
from secant.bench.problems import get_problem
from secant.linalg.neumann_series import (
    bounded_regulariser_coefficient,
    growth_guard,
    mu_schedule,
    regulariser_coefficient,
)

pytestmark = pytest.mark.usefixtures("float64_default")

SHAPES = ((5, 4), (4,), (3,))
N = sum(math.prod(s) for s in SHAPES)  # 27 scalar parameters


def make_params(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def _problem(seed=1):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen))
    h = q @ torch.diag(torch.linspace(-0.2, 3.0, N)) @ q.T  # indefinite: non-convex
    noise = torch.randn(200, N, generator=gen)
    return h, noise


H, NOISE = _problem()


def loss_flat(x, t):
    """Non-convex stochastic objective: indefinite quadratic + quartic + noisy linear term."""
    return 0.5 * x @ H.to(x.dtype) @ x + 0.05 * (x**4).sum() - NOISE[t % 200].to(x.dtype) @ x


def grad_flat(x, t):
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_flat(x, t), x)
    return g


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_grads(params, t):
    for p in params:
        p.grad = None
    loss_flat(torch.cat([p.reshape(-1) for p in params]), t).backward()


def reg_grad_autograd(w, v, alpha, beta_eff):
    """∇_w [(α/3)‖w−v‖³ + β/‖w−v‖] with v fixed, by autograd (0 at w = v: the guard)."""
    if torch.equal(w, v):
        return torch.zeros_like(w)
    w = w.detach().clone().requires_grad_()
    r = torch.linalg.vector_norm(w - v)
    (g,) = torch.autograd.grad(alpha / 3 * r**3 + beta_eff / r, w)
    return g


def reg_grad_bounded(w, v, g, alpha, beta_eff, ratio):
    """The paper's regulariser gradient, shortened (same direction) to length ratio·‖g‖ where
    it is longer: the library's default form (docs/neumann.md)."""
    rg = reg_grad_autograd(w, v, alpha, beta_eff)
    length, cap = torch.linalg.vector_norm(rg), ratio * torch.linalg.vector_norm(g)
    return rg * (cap / length) if length > cap else rg


def reference(w0, steps, lr_fn, alpha, beta_eff, gamma, mu_fn, burn_in, resets, skip=(),
              ratio=None):
    """Algorithm 2 (docs/neumann.md) on one flat vector, decisions (i)–(v) as documented;
    ``ratio=None`` the paper's regulariser, else the bounded one."""
    w, m, v, mu = w0.clone(), torch.zeros_like(w0), w0.clone(), 0.0
    t = 0
    for k in range(1, steps + 1):
        t += 1  # a skipped step still advances the schedule (host-side count)
        if k in skip:
            continue
        g, lr = grad_flat(w, k), lr_fn(t)
        if t <= burn_in:
            w = w - lr * g
            continue
        s = t - burn_in  # v = copy(w0) throughout the burn-in (decision iii)
        mu = mu_fn(s)
        if s in resets:
            m = -lr * g
            continue
        if ratio is None:
            d = g + reg_grad_autograd(w, v, alpha, beta_eff)
        else:
            d = g + reg_grad_bounded(w, v, g, alpha, beta_eff, ratio)
        m = mu * m - lr * d
        w = w + mu * m - lr * d
        v = gamma * v + (1 - gamma) * w
    return w, m, v, mu


def run(opt, params, steps, sched=None, nan_at=()):
    for k in range(1, steps + 1):
        set_grads(params, k)
        if k in nan_at:
            params[1].grad[0] = float("nan")
        opt.step()
        if sched is not None:
            sched.step()


def neumann_inner_loop(grad, w, lr, inner_steps):
    """Algorithm 1 of the paper (idealised, one mini-batch): m₀ = −∇f(w),
    m_k = m_{k−1} − ∇f(w + η m_{k−1}); the displaced gradient replaces a Hessian-vector product."""
    m = -grad(w)
    for _ in range(inner_steps):
        m = m - grad(w + lr * m)
    return m


def test_o_n1_neumann_inner_loop_is_richardson():
    gen = torch.Generator().manual_seed(3)
    n = 8
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    a = q @ torch.diag(torch.logspace(-1, 0.5, n)) @ q.T
    b, w = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    lr = 0.9 / torch.linalg.eigvalsh(a).max().item()
    g = a @ w - b
    eye = torch.eye(n)
    for k in (0, 1, 5, 20):
        m = neumann_inner_loop(lambda x: a @ x - b, w, lr, k)
        want = -(eye - torch.linalg.matrix_power(eye - lr * a, k + 1)) @ torch.linalg.solve(a, g)
        torch.testing.assert_close(lr * m, want, rtol=1e-12, atol=1e-12)
    m = neumann_inner_loop(lambda x: a @ x - b, w, lr, 2000)
    torch.testing.assert_close(w + lr * m, torch.linalg.solve(a, b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_o_n2_equals_nesterov_sgd(dtype, tol):
    mu = 0.85
    p_ref, p_neu = make_params(dtype=dtype), make_params(dtype=dtype)
    sgd = torch.optim.SGD([{"params": p_ref[:2]}, {"params": p_ref[2:], "lr": 0.01}], lr=0.03,
                          momentum=mu, nesterov=True)
    neu = Neumann([{"params": p_neu[:2]}, {"params": p_neu[2:], "lr": 0.01}], lr=0.03,
                  alpha=0.0, beta=0.0, mu_min=mu, mu_max=mu, burn_in_steps=0, reset_period=None,
                  grad_growth=None)
    for k in range(1, 51):
        for ps, opt in ((p_ref, sgd), (p_neu, neu)):
            set_grads(ps, k)
            opt.step()
        for a, b in zip(p_ref, p_neu):
            torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    assert flat(p_ref).abs().max() < 1e3  # the run stayed bounded


def test_o_n3_regulariser_coefficient_matches_autograd():
    gen = torch.Generator().manual_seed(4)
    for scale in (1e-3, 0.3, 7.0):
        w, v = torch.randn(30, generator=gen), torch.randn(30, generator=gen)
        v = w + scale * (v - w)
        alpha, beta = 0.2, 0.05
        c = regulariser_coefficient(torch.linalg.vector_norm(w - v), alpha, beta, 1e-12)
        torch.testing.assert_close(c * (w - v), reg_grad_autograd(w, v, alpha, beta),
                                   rtol=1e-12, atol=0)
    zero = regulariser_coefficient(torch.tensor(0.0), 0.2, 0.05, 1e-12)
    assert zero.item() == 0.0


@pytest.mark.parametrize("form,ratio", [("paper", None), ("bounded", 0.01), ("bounded", 1e3)])
def test_o_n3_step_uses_global_regulariser_with_beta_times_n(form, ratio):
    params = make_params()
    alpha, beta, lr, mu = 0.3, 1e-3, 0.05, 0.7
    kw = {} if ratio is None else {"reg_ratio": ratio}
    opt = Neumann(params, lr=lr, alpha=alpha, beta=beta, mu_min=mu, mu_max=mu, gamma=0.9,
                  regularizer=form, **kw)
    run(opt, params, 1)  # first Neumann step (no reset)
    gen = torch.Generator().manual_seed(5)
    for p in params:  # arbitrary state: m random, v near w
        opt.state[p]["m"].copy_(torch.randn(p.shape, generator=gen))
        opt.state[p]["v"].copy_(p.detach() + 0.2 * torch.randn(p.shape, generator=gen))
    w, m = flat(params), torch.cat([opt.state[p]["m"].reshape(-1) for p in params])
    v = torch.cat([opt.state[p]["v"].reshape(-1) for p in params])
    run_step = 2
    set_grads(params, run_step)
    g = torch.cat([p.grad.reshape(-1) for p in params])
    opt.step()
    assert opt.beta_effective == beta * N
    paper = reg_grad_autograd(w, v, alpha, beta * N)
    d = g + (paper if ratio is None else reg_grad_bounded(w, v, g, alpha, beta * N, ratio))
    if ratio == 0.01:  # the bound is active here: the term is shortened, not turned
        assert torch.linalg.vector_norm(paper) > 0.02 * torch.linalg.vector_norm(g)
        torch.testing.assert_close(torch.linalg.vector_norm(d - g),
                                   0.01 * torch.linalg.vector_norm(g))
    if ratio == 1e3:  # inactive: the paper's term exactly
        torch.testing.assert_close(d - g, paper)
    m_new = mu * m - lr * d
    w_new = w + mu * m_new - lr * d
    torch.testing.assert_close(flat(params), w_new, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([opt.state[p]["m"].reshape(-1) for p in params]), m_new)
    v_new = torch.cat([opt.state[p]["v"].reshape(-1) for p in params])
    torch.testing.assert_close(v_new, 0.9 * v + 0.1 * w_new, rtol=1e-12, atol=1e-12)
    # negative control: the regulariser really moved the step
    assert (d - g).abs().max() > 1e-3


def test_o_n4_mu_schedule_and_reset_schedule():
    assert mu_schedule(100, 100, 0.5, 0.9) == pytest.approx(0.5)
    assert mu_schedule(900, 100, 0.5, 0.9) == pytest.approx(0.9)
    assert mu_schedule(300, 100, 0.5, 0.9) == pytest.approx(0.75)
    assert mu_schedule(1, 100, 0.5, 0.9) == 0.5 and mu_schedule(10**6, 100, 0.5, 0.9) == 0.9
    assert all(mu_schedule(s, 7, 0.3, 0.3) == 0.3 for s in range(1, 50))
    assert Neumann.paper_periods(40) == {"burn_in_steps": 200, "reset_period": 400,
                                         "mu_period": 40}


def test_resets_happen_at_doubling_gaps():
    """Neumann steps 1, 1+K, 1+3K, 1+7K reset m (K = 10 here), and no other step does."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = Neumann([w], lr=0.01, alpha=0.0, beta=0.0, reset_period=10)
    reset_at = []
    for t in range(1, 80):
        w.grad = torch.full((3,), 0.1 * t)
        before = opt.diagnostics()["resets"]
        opt.step()
        if opt.diagnostics()["resets"] > before:
            reset_at.append(t)
    assert reset_at == [1, 11, 31, 71]


@pytest.mark.parametrize("form_kw,ratio", [({"regularizer": "paper"}, None),
                                           ({"reg_ratio": 0.01}, 0.01)])
def test_o_n4_full_trajectory_matches_reference_with_scheduler(form_kw, ratio):
    """Burn-in, μ schedule, resets at 1, 1+K, 1+3K, 1+7K, cubic + repulsive terms (paper or
    bounded), v EMA, lr scheduler, and the undisplaced weights w − μ m, against the flat
    transcription."""
    steps, burn, k_reset, period = 32, 3, 3, 4
    alpha, beta, gamma = 0.05, 2e-6, 0.8
    params = make_params()
    w0 = flat(params)
    opt = Neumann(params, lr=0.04, alpha=alpha, beta=beta, gamma=gamma, mu_min=0.5, mu_max=0.9,
                  burn_in_steps=burn, reset_period=k_reset, mu_period=period, **form_kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    run(opt, params, steps, sched)

    def lr_fn(t):
        return 0.04 * 0.7 ** ((t - 1) // 5)

    def mu_fn(s):
        return min(0.9, max(0.5, 1 - 1 / (1 + s / period)))

    resets = {1, 4, 10, 22}  # 1, 1+K, 1+3K, 1+7K with K = 3
    w, m, v, mu = reference(w0, steps, lr_fn, alpha, beta * N, gamma, mu_fn, burn, resets,
                            ratio=ratio)
    torch.testing.assert_close(flat(params), w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([opt.state[p]["v"].reshape(-1) for p in params]), v,
                               rtol=1e-10, atol=1e-12)
    before = [p.detach().clone() for p in params]
    with opt.undisplaced():
        torch.testing.assert_close(flat(params), w - mu * m, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    diag = opt.diagnostics()
    assert diag["resets"] == 4 and diag["next_reset"] == 46 and diag["mu"] == mu_fn(steps - burn)
    assert 0.5 <= diag["mu"] <= 0.9
    # negative control: without the regulariser the trajectory differs
    w0_run = reference(w0, steps, lr_fn, 0.0, 0.0, gamma, mu_fn, burn, resets)[0]
    assert (w0_run - w).abs().max() > 1e-4
    if ratio is not None:  # negative control: the bound was active in this run
        w_paper = reference(w0, steps, lr_fn, alpha, beta * N, gamma, mu_fn, burn, resets)[0]
        assert (w_paper - w).abs().max() > 1e-4


def test_o_n4_reset_sets_m_and_moves_nothing():
    params = make_params()
    opt = Neumann(params, lr=0.05, alpha=0.0, beta=0.0, reset_period=2, mu_period=1)
    run(opt, params, 2)  # step 1 reset, step 2 ordinary; next reset at 3
    w, vs = flat(params), [opt.state[p]["v"].clone() for p in params]
    set_grads(params, 3)
    grads = [p.grad.clone() for p in params]
    opt.step()
    assert torch.equal(flat(params), w)
    assert all(torch.equal(opt.state[p]["v"], v) for p, v in zip(params, vs))
    assert all(torch.equal(opt.state[p]["m"], -0.05 * g) for p, g in zip(params, grads))


def test_burn_in_is_plain_sgd_and_v_stays_at_w0():
    p_ref, p_neu = make_params(), make_params()
    w0 = flat(p_neu)
    sgd = torch.optim.SGD(p_ref, lr=0.02)
    neu = Neumann(p_neu, lr=0.02, burn_in_steps=6, reset_period=5)
    for k in range(1, 7):
        for ps, opt in ((p_ref, sgd), (p_neu, neu)):
            set_grads(ps, k)
            opt.step()
        for a, b in zip(p_ref, p_neu):
            torch.testing.assert_close(b, a, rtol=1e-14, atol=1e-15)
    assert neu.diagnostics()["neumann_step"] == 0
    set_grads(p_neu, 7)
    neu.step()  # first Neumann step: a reset; v is still the copy of w0 taken at construction
    assert torch.equal(torch.cat([neu.state[p]["v"].reshape(-1) for p in p_neu]), w0)
    assert neu.diagnostics()["distance_to_average"] > 0.01


def test_o_n5_no_nan_when_w_equals_v_and_no_aliasing():
    params = make_params()
    opt = Neumann(params, lr=0.05, alpha=1e-2, beta=1e-3)
    for p in params:
        assert opt.state[p]["v"].data_ptr() != p.data_ptr()
    run(opt, params, 5)
    for p in params:  # force w = v exactly
        opt.state[p]["v"].copy_(p.detach())
    m = [opt.state[p]["m"].clone() for p in params]
    mu = opt.diagnostics()["mu"]
    set_grads(params, 6)
    grads, w = [p.grad.clone() for p in params], [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    for p, w0, m0, g in zip(params, w, m, grads):  # the guard drops the regulariser
        m_new = mu * m0 - 0.05 * g
        torch.testing.assert_close(p.detach(), w0 + mu * m_new - 0.05 * g)
    sd = opt.state_dict()
    opt2 = Neumann(params, lr=0.05, alpha=1e-2, beta=1e-3)
    opt2.load_state_dict(sd)
    for p in params:
        assert opt2.state[p]["v"].data_ptr() not in (p.data_ptr(), opt.state[p]["v"].data_ptr())


def test_nonfinite_gradients_are_skipped_and_counted():
    kw = dict(lr=0.03, alpha=0.05, beta=2e-6, gamma=0.8, burn_in_steps=2, reset_period=3,
              mu_period=4, regularizer="paper")
    params = make_params()
    w0 = flat(params)
    opt = Neumann(params, **kw)
    run(opt, params, 4)
    state = {p: {k: t.clone() for k, t in opt.state[p].items()} for p in params}
    w = flat(params)
    set_grads(params, 5)
    params[0].grad[1, 2] = float("inf")
    opt.step()
    assert torch.equal(flat(params), w)
    assert all(torch.equal(opt.state[p][k], state[p][k]) for p in params for k in ("m", "v"))
    assert opt.diagnostics()["skipped_steps"] == 1 and opt.diagnostics()["step"] == 5
    for k in range(6, 16):
        set_grads(params, k)
        opt.step()

    def mu_fn(s):
        return min(0.9, max(0.5, s / (s + 4)))

    ref = reference(w0, 15, lambda t: 0.03, 0.05, 2e-6 * N, 0.8, mu_fn, 2, {1, 4, 10},
                    skip={5})[0]
    torch.testing.assert_close(flat(params), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("split", [2, 5, 9])
def test_exact_resume_bitwise(split):
    kw = dict(lr=0.03, alpha=0.05, beta=2e-6, gamma=0.8, burn_in_steps=3, reset_period=2,
              mu_period=3)
    total = 14
    params = make_params()
    opt = Neumann(params, **kw)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
    run(opt, params, total, sched)

    p1 = make_params()
    opt1 = Neumann(p1, **kw)
    sched1 = torch.optim.lr_scheduler.ExponentialLR(opt1, gamma=0.95)
    for k in range(1, split + 1):
        set_grads(p1, k)
        opt1.step()
        sched1.step()
    buf = io.BytesIO()
    torch.save({"p": [p.detach() for p in p1], "opt": opt1.state_dict(),
                "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    p2 = [t.clone().requires_grad_() for t in ckpt["p"]]
    opt2 = Neumann(p2, **kw)
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, gamma=0.95)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for k in range(split + 1, total + 1):
        set_grads(p2, k)
        opt2.step()
        sched2.step()
    assert all(torch.equal(a, b) for a, b in zip(params, p2))
    assert all(torch.equal(opt.state[a][k], opt2.state[b][k])
               for a, b in zip(params, p2) for k in ("m", "v"))
    assert opt.diagnostics() == opt2.diagnostics()


def test_state_dict_is_a_snapshot():
    params = make_params()
    opt = Neumann(params, lr=0.03, reset_period=2)
    run(opt, params, 3)
    sd = opt.state_dict()
    step = sd["state"][0]["neumann_step"]
    run(opt, params, 2)
    assert sd["state"][0]["neumann_step"] == step == 3
    assert set(sd["state"]) == set(range(len(params)))  # every entry belongs to a parameter
    with pytest.raises(ValueError, match="Neumann"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1).state_dict())


def test_undisplaced_context_restores_and_blocks_step():
    params = make_params()
    opt = Neumann(params, lr=0.05, mu_min=0.8, mu_max=0.8)
    run(opt, params, 4)
    before = [p.detach().clone() for p in params]
    with pytest.raises(KeyError):
        with opt.undisplaced():
            assert not torch.equal(params[0], before[0])
            with pytest.raises(RuntimeError, match="undisplaced"):
                opt.step()
            raise KeyError("boom")
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_works_with_closure_and_no_grad_params():
    params = make_params()
    extra = torch.ones(2, requires_grad=True)  # never gets a gradient
    opt = Neumann([*params, extra], lr=0.05)

    def closure():
        opt.zero_grad()
        loss = loss_flat(torch.cat([p.reshape(-1) for p in params]), 1)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and torch.isfinite(loss)
    assert torch.equal(extra, torch.ones(2)) and opt.num_params == N + 2


@pytest.mark.parametrize("kwargs", [
    dict(lr=-0.1), dict(lr=float("nan")), dict(alpha=-1.0), dict(beta=-1e-5),
    dict(beta=float("inf")), dict(gamma=1.0), dict(gamma=-0.1), dict(mu_min=-0.1),
    dict(mu_min=0.6, mu_max=0.5), dict(mu_max=1.0), dict(burn_in_steps=-1),
    dict(burn_in_steps=2.5), dict(reset_period=0), dict(reset_period=1.5), dict(mu_period=0),
    dict(reg_eps=-1.0), dict(regularizer="cubic"), dict(reg_ratio=-0.1),
    dict(reg_ratio=float("nan")), dict(grad_growth=0.5), dict(grad_growth=float("inf")),
])
def test_bad_arguments(kwargs):
    name = next(iter(kwargs)) if "mu_max" not in kwargs else "mu_max"
    args = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=f"{name}="):
        Neumann(make_params(), **args)
    with pytest.raises(ValueError, match="steps_per_epoch="):
        Neumann.paper_periods(0)


def test_bounded_coefficient_matches_rescaled_autograd():
    gen = torch.Generator().manual_seed(6)
    alpha, beta = 0.2, 0.05
    for scale, g_len in ((1e-3, 1.0), (0.3, 0.01), (0.3, 100.0), (7.0, 1e-3)):
        w, v = torch.randn(30, generator=gen), torch.randn(30, generator=gen)
        v = w + scale * (v - w)
        g = torch.randn(30, generator=gen)
        g = g * (g_len / torch.linalg.vector_norm(g))
        c = bounded_regulariser_coefficient(torch.linalg.vector_norm(w - v),
                                            torch.linalg.vector_norm(g), alpha, beta, 1e-12, 0.1)
        torch.testing.assert_close(c * (w - v), reg_grad_bounded(w, v, g, alpha, beta, 0.1),
                                   rtol=1e-12, atol=1e-15)
    zero = bounded_regulariser_coefficient(torch.tensor(0.0), torch.tensor(1.0), 0.2, 0.05,
                                           1e-12, 0.1)
    assert zero.item() == 0.0


def _tiny_classifier_run(lr, warmup=False, clip=False, **kw):
    """20 steps on a 16-32-4 tanh MLP; returns (start, end) full-data losses, the end at the
    undisplaced weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = x[:, :4].argmax(1)
    opt = Neumann(model.parameters(), lr=lr, **kw)
    sched = (torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=10)
             if warmup else None)

    def loss(idx=slice(None)):
        return torch.nn.functional.cross_entropy(model(x[idx]), y[idx])

    with torch.no_grad():
        start = loss().item()
    for k in range(20):
        opt.zero_grad()
        loss(slice(k * 32 % 256, k * 32 % 256 + 32)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
    with torch.no_grad(), opt.undisplaced():
        return start, loss().item()


@pytest.mark.parametrize("lr,warmup,clip", [(1e-3, False, False), (1e-2, True, False),
                                            (1e-3, True, True)])
def test_paper_form_blows_up_at_small_steps_and_default_does_not(lr, warmup, clip):
    """The paper's repulsive term β·n/‖w − v‖² dominates while w is near v, worst at small
    steps (small lr, warm-up, clipping); the bounded default keeps the loss below its start."""
    start, end = _tiny_classifier_run(lr, warmup, clip, regularizer="paper")
    assert end > start  # the reported failure, reproduced
    start, end = _tiny_classifier_run(lr, warmup, clip)
    assert end < start


def test_bf16_parameters_keep_float32_state_and_track_float32_run():
    torch.manual_seed(0)
    p32 = make_params(dtype=torch.float32)
    p16 = [p.detach().to(torch.bfloat16).requires_grad_() for p in p32]
    p32 = [p.detach().to(torch.bfloat16).float().requires_grad_() for p in p16]  # same start
    kw = dict(lr=0.02, alpha=0.05, beta=1e-4, mu_min=0.8, mu_max=0.8)
    o32, o16 = Neumann(p32, **kw), Neumann(p16, **kw)
    assert all(o16.state[p][k].dtype == torch.float32 for p in p16 for k in ("m", "v"))
    for k in range(1, 31):
        for ps, opt in ((p32, o32), (p16, o16)):
            set_grads(ps, k)
            opt.step()
    assert all(p.dtype == torch.bfloat16 for p in p16)
    v16 = torch.cat([o16.state[p]["v"].reshape(-1) for p in p16])
    v32 = torch.cat([o32.state[p]["v"].reshape(-1) for p in p32])
    assert (v16 - flat(p16).float()).abs().max() > 1e-3  # v lags w: its EMA was not rounded away
    torch.testing.assert_close(flat(p16).float(), flat(p32), rtol=0.05, atol=0.05)
    torch.testing.assert_close(v16, v32, rtol=0.05, atol=0.05)
    before = [p.detach().clone() for p in p16]
    with o16.undisplaced():
        m = torch.cat([o16.state[p]["m"].reshape(-1) for p in p16])
        want = (torch.cat([b.float().reshape(-1) for b in before]) - 0.8 * m).bfloat16()
        assert torch.equal(flat(p16), want)
    assert all(torch.equal(a, b) for a, b in zip(before, p16))
    buf = io.BytesIO()
    torch.save(o16.state_dict(), buf)
    buf.seek(0)
    o16b = Neumann(p16, **kw)
    o16b.load_state_dict(torch.load(buf, weights_only=True))
    assert all(o16b.state[p][k].dtype == torch.float32
               and torch.equal(o16b.state[p][k], o16.state[p][k]) for p in p16 for k in "mv")


def test_grad_scaler_skipped_steps_leave_state_untouched():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).float()
    opt = Neumann(model.parameters(), lr=0.05)
    w0 = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 grads overflow at first
    x = torch.randn(16, 4, dtype=torch.float32)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if opt.diagnostics()["step"] == 0:  # skipped by the scaler: nothing moved
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
            assert all(torch.equal(opt.state[p]["v"], q) and not opt.state[p]["m"].any()
                       for p, q in zip(model.parameters(), w0))
        losses.append(loss.item())
    assert scaler.get_scale() < 2.0**40 and opt.diagnostics()["step"] > 10
    assert all(torch.isfinite(p).all() for p in model.parameters()) and losses[-1] < losses[0]


def test_add_param_group_gets_fresh_state_and_follows_nesterov():
    """With α = β = 0 and constant μ a group added mid-run follows Nesterov SGD from a fresh
    buffer, as torch.optim.SGD's add_param_group does."""
    p_ref, p_neu = make_params(), make_params()
    sgd = torch.optim.SGD(p_ref[:2], lr=0.03, momentum=0.7, nesterov=True)
    neu = Neumann(p_neu[:2], lr=0.03, alpha=0.0, beta=0.0, mu_min=0.7, mu_max=0.7,
                  grad_growth=None)
    for k in range(1, 16):
        if k == 6:
            sgd.add_param_group({"params": [p_ref[2]], "lr": 0.01})
            neu.add_param_group({"params": [p_neu[2]], "lr": 0.01})
            assert neu.num_params == N and neu.beta_effective == 0.0
        for ps, opt in ((p_ref, sgd), (p_neu, neu)):
            set_grads(ps, k)
            opt.step()
    for a, b in zip(p_ref, p_neu):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="lr="):
        neu.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0})
    with pytest.raises(ValueError, match="param_group keys="):
        neu.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "gamma": 0.5})
    assert len(neu.param_groups) == 2


def test_steady_state_step_has_no_host_sync(monkeypatch):
    params = make_params()
    opt = Neumann(params, lr=0.03, reset_period=3, burn_in_steps=2)
    run(opt, params, 3)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in Neumann.step")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for k in range(4, 12):  # regular steps and a reset
        set_grads(params, k)
        opt.step()
    set_grads(params, 12)
    params[0].grad[0, 0] = float("nan")
    opt.step()  # a skipped step does not sync either
    monkeypatch.undo()
    assert opt.diagnostics()["skipped_steps"] == 1 and opt.diagnostics()["resets"] == 3


def guard_scales(norms, growth, decay=0.9):
    """The growth guard on a list of gradient norms, in Python floats: each norm is cut to at
    most ``growth`` times the running average of the cut norms before it (docs/neumann.md)."""
    avg, scales = 0.0, []
    for n in norms:
        if not math.isfinite(n):
            scales.append(1.0)
            continue
        s = min(1.0, growth * avg / n) if avg > 0 else 1.0
        avg = n * s if avg == 0 else decay * avg + (1 - decay) * n * s
        scales.append(s)
    return scales


def test_growth_guard_matches_python_reference():
    norms = [2.0, 2.5, 30.0, float("nan"), 3.0, 0.5, 9.0, 9.0, 9.0, 9.0, 1e6]
    avg, got = torch.zeros(()), []
    for n in norms:
        scale, avg = growth_guard(torch.tensor(n), avg, 2.0, 0.9)
        got.append(scale.item())
    want = guard_scales(norms, 2.0)
    assert want[2] < 0.2 and want[-1] < 1e-4  # the guard bound in this sequence
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-12, atol=0)


def test_growth_guard_step_is_nesterov_sgd_on_cut_gradients():
    """α = β = 0, constant μ: the default Neumann with gradient spikes (×40 at steps 6 and 13)
    and a NaN step equals torch.optim.SGD(nesterov) fed the gradients cut by the Python rule."""
    mu, spikes, nan_step = 0.8, {6: 40.0, 13: 40.0}, 9
    p_ref, p_neu = make_params(), make_params()
    sgd = torch.optim.SGD(p_ref, lr=0.02, momentum=mu, nesterov=True)
    neu = Neumann(p_neu, lr=0.02, alpha=0.0, beta=0.0, mu_min=mu, mu_max=mu)
    avg_norms = []
    for k in range(1, 21):
        for ps in (p_ref, p_neu):
            set_grads(ps, k)
            for p in ps:
                p.grad.mul_(spikes.get(k, 1.0))
        g_norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in p_ref]))
        avg_norms.append(float(g_norm) if k != nan_step else float("nan"))
        if k == nan_step:
            p_neu[0].grad[0, 0] = float("nan")
        else:
            scale = guard_scales(avg_norms, 2.0)[-1]
            for p in p_ref:
                p.grad.mul_(scale)
            sgd.step()
        neu.step()
        for a, b in zip(p_ref, p_neu):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert min(guard_scales(avg_norms, 2.0)) < 0.1  # the spikes were cut
    assert neu.diagnostics()["skipped_steps"] == 1


def _digits_autoencoder_run(lr, seed, steps=60, **kw):
    """The harness's digits autoencoder (sigmoid, pixel-summed BCE, batch 100): start loss and
    end loss at the undisplaced weights on 500 fixed images."""
    prob = get_problem("digits")
    x = get_problem("digits-clf").load(None, False).x_train.to(torch.float64)
    torch.manual_seed(seed)
    model = prob.build().double()
    opt = Neumann(model.parameters(), lr=lr, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start = float(prob.loss(model, x[:500], None))
    for _ in range(steps):
        idx = torch.randint(len(x), (100,), generator=gen)
        opt.zero_grad()
        prob.loss(model, x[idx], None).backward()
        opt.step()
    with torch.no_grad(), opt.undisplaced():
        return start, float(prob.loss(model, x[:500], None))


def test_growth_guard_keeps_lr_1_autoencoder_from_blowing_up():
    """At lr 1 the digits autoencoder is past its edge of stability: without the guard the
    gradient norm grows geometrically and the run ends at NaN/huge loss on some seeds
    (benchmarks/neumann_safety.md); with the default guard every seed ends below its start."""
    unguarded = [_digits_autoencoder_run(1.0, seed, grad_growth=None) for seed in range(4)]
    assert any(not (end < start) for start, end in unguarded)  # the failure, reproduced
    for seed in range(4):
        start, end = _digits_autoencoder_run(1.0, seed)
        assert end < start



def test_compiled_update_equals_eager_and_compiles_each_kind_of_step_once():
    """``compile=backend``: each kind of step's update (burn-in, reset, regular) is one graph
    (``fullgraph``: a graph break would raise), compiled at its first use and never again
    across 32 steps with an LR scheduler, a skipped non-finite step, and gradients alternately
    replaced (``zero_grad(set_to_none=True)``) and overwritten in place; the trajectory equals
    the eager one."""
    kw = dict(lr=0.04, alpha=0.05, beta=2e-6, gamma=0.8, burn_in_steps=3, reset_period=3,
              mu_period=4)
    finals, compiled_at = [], []
    for backend in (False, COUNTING):
        GRAPHS.clear()
        params = make_params()
        opt = Neumann(params, compile=backend, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
        for k in range(1, 33):
            before = len(GRAPHS)
            if k % 2 or k < 3:
                set_grads(params, k)  # fresh .grad tensors
            else:  # the same .grad tensors, overwritten
                old = [p.grad for p in params]
                set_grads(params, k)
                for o, p in zip(old, params):
                    p.grad = o.copy_(p.grad)
            if k == 12:
                params[1].grad[0] = float("nan")
            opt.step()
            sched.step()
            if len(GRAPHS) > before:
                compiled_at.append(k)
        finals.append(flat(params))
    assert compiled_at == [1, 4, 5]  # burn-in, the first reset, the first regular step
    assert opt.diagnostics()["skipped_steps"] == 1
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-12, atol=1e-14)
    # a compiled optimizer pickles (its compiled code is left out) and the copy steps alike
    params = make_params()
    opt = Neumann(params, compile=COUNTING, **kw)
    run(opt, params, 6)
    copied = pickle.loads(pickle.dumps(opt))
    twins = [q for g in copied.param_groups for q in g["params"]]
    set_grads(params, 7)
    for p, q in zip(params, twins):
        q.grad = p.grad.clone()
    opt.step()
    copied.step()
    assert torch.equal(flat(twins), flat(params))


def test_compile_flag_is_checked():
    with pytest.raises(ValueError, match="compile='no-such-backend'"):
        Neumann(make_params(), compile="no-such-backend")


def test_compiled_optimizers_each_keep_their_own_graphs():
    """Every kind of step of every optimizer compiles its own code: 4 optimizers × 3 kinds are
    12 graphs, past dynamo's 8 per code object, which ``fullgraph`` turns into an error."""
    kw = dict(lr=0.04, alpha=0.05, beta=2e-6, gamma=0.8, burn_in_steps=3, reset_period=3)
    GRAPHS.clear()
    for _ in range(4):
        params = make_params()
        run(Neumann(params, compile=COUNTING, **kw), params, 6)
    assert len(GRAPHS) == 12
