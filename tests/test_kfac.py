"""K-FAC: O-F2 against torch.func, full steps against a dense float64 Kronecker reference, Conv2d
factors against an explicit unfold, periods, sampled Fisher, fallback = torch.optim.SGD,
exact resume, errors."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from counting_backend import GRAPHS
from counting_backend import NAME as COUNTING
from layer_helpers import make_closure, no_host_sync, wtilde
from torch import nn
from torch.func import functional_call, grad

from secant.layers import sampled_mse
from secant.optim.kfac import KFAC

D = torch.float64


def vec_f(x):
    return x.T.reshape(-1)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)


def batches(n_steps, n=7, seed=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g))
            for _ in range(n_steps)]


def reference_stats(model, x, y):
    """A, G and ∇W̃ of both layers computed directly (retain_grad), no hooks."""
    l1, l2 = model[0], model[2]
    w1, w2 = wtilde(l1).requires_grad_(), wtilde(l2).requires_grad_()
    a0 = torch.cat((x, torch.ones(len(x), 1, dtype=D)), 1)
    h1 = a0 @ w1.T
    a1 = torch.cat((torch.tanh(h1), torch.ones(len(x), 1, dtype=D)), 1)
    h2 = a1 @ w2.T
    h1.retain_grad()
    h2.retain_grad()
    F.cross_entropy(h2, y).backward()
    n = len(x)
    out = []
    for a, h, w in ((a0, h1, w1), (a1.detach(), h2, w2)):
        g = h.grad * n
        out.append((a.T @ a / n, g.T @ g / n, w.grad.clone(), w.detach().clone()))
    return out


def test_of2_single_example_factors_equal_exact_fisher_block():
    torch.manual_seed(3)
    lin = nn.Linear(4, 3).to(D)
    x, y = torch.randn(1, 4, dtype=D), torch.tensor([2])
    opt = KFAC(lin, lr=0.0, factor_update_period=1, kl_clip=None)
    opt.step(make_closure(opt, lin, x, y))
    st = opt.state["kfac"]["layers"][0]

    def loss_of(params):
        return F.cross_entropy(functional_call(lin, params, (x,)), y)

    gr = grad(loss_of)({k: v.detach() for k, v in lin.named_parameters()})
    g_tilde = torch.cat((gr["weight"], gr["bias"][:, None]), 1)
    fisher = torch.outer(vec_f(g_tilde), vec_f(g_tilde))
    torch.testing.assert_close(torch.kron(st["A"], st["G"]), fisher, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_two_steps_match_dense_reference(method):
    lr, lam, mu, wd, kappa = 0.3, 0.05, 0.9, 1e-2, 1e-3
    model = mlp()
    ref = mlp()
    data = batches(2)
    opt = KFAC(model, lr=lr, damping=lam, momentum=mu, weight_decay=wd, factor_decay=0.95,
               factor_update_period=1, inverse_update_period=1, kl_clip=kappa,
               inverse_method=method)
    facs = [None, None]
    bufs = [torch.zeros(4, 6, dtype=D), torch.zeros(3, 5, dtype=D)]
    for k, (x, y) in enumerate(data, start=1):
        opt.step(make_closure(opt, model, x, y))
        stats = reference_stats(ref, x, y)
        eps = min(1 - 1 / k, 0.95)
        dirs, xs = [], []
        for i, (a, g, gw, w) in enumerate(stats):
            facs[i] = (a, g) if facs[i] is None else (
                eps * facs[i][0] + (1 - eps) * a, eps * facs[i][1] + (1 - eps) * g)
            fa, fg = facs[i]
            pi = math.sqrt((torch.trace(fa) / len(fa)) / (torch.trace(fg) / len(fg)))
            da = fa + pi * math.sqrt(lam) * torch.eye(len(fa), dtype=D)
            dg = fg + math.sqrt(lam) / pi * torch.eye(len(fg), dtype=D)
            xg = gw + wd * w
            p = torch.linalg.solve(torch.kron(da, dg), vec_f(xg)).reshape(xg.shape[1], -1).T
            dirs.append(p)
            xs.append(xg)
        quad = lr**2 * sum(float((p * x_).sum()) for p, x_ in zip(dirs, xs))
        nu = min(1.0, math.sqrt(kappa / quad))
        with torch.no_grad():
            for lin, buf, p in zip((ref[0], ref[2]), bufs, dirs):
                buf.mul_(mu).add_(nu * p)
                lin.weight.sub_(lr * buf[:, :-1])
                lin.bias.sub_(lr * buf[:, -1])
        for lin_o, lin_r in ((model[0], ref[0]), (model[2], ref[2])):
            torch.testing.assert_close(wtilde(lin_o), wtilde(lin_r), rtol=1e-9, atol=1e-11)
    assert opt.diagnostics()["stats_rejected"] == 0


def test_exact_damping_mode_matches_dense():
    lam = 0.1
    model, ref = mlp(1), mlp(1)
    (x, y), = batches(1)
    opt = KFAC(model, lr=1.0, damping=lam, momentum=0.0, kl_clip=None,
               damping_mode="exact", factor_update_period=1)
    opt.step(make_closure(opt, model, x, y))
    for (a, g, gw, w), lin in zip(reference_stats(ref, x, y), (model[0], model[2])):
        dense = torch.kron(a, g) + lam * torch.eye(a.shape[0] * g.shape[0], dtype=D)
        p = torch.linalg.solve(dense, vec_f(gw)).reshape(gw.shape[1], -1).T
        torch.testing.assert_close(wtilde(lin), w - p, rtol=1e-8, atol=1e-10)


def test_conv2d_factors_match_explicit_unfold():
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).to(D)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 2).to(D))
    x = torch.randn(4, 2, 5, 5, dtype=D)
    y = torch.randint(0, 2, (4,))
    # explicit: unfold patches, append 1; output grads by retain_grad on the conv output
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # [N, L, 18]
    a = torch.cat((cols, torch.ones(4, cols.shape[1], 1, dtype=D)), -1).reshape(-1, 19)
    h = conv(x)
    h.retain_grad()
    F.cross_entropy(model[3](model[2](torch.tanh(h))), y).backward()
    opt = KFAC(model, lr=0.0, factor_update_period=1)
    g = (h.grad * 4).permute(0, 2, 3, 1).reshape(-1, 3)
    want_a = a.T @ a / a.shape[0]
    want_g = g.T @ g / 4
    opt.step(make_closure(opt, model, x, y))
    st = opt.state["kfac"]["layers"][0]
    torch.testing.assert_close(st["A"], want_a)
    torch.testing.assert_close(st["G"], want_g)


def test_periods_and_capture_only_when_needed():
    model = mlp()
    opt = KFAC(model, lr=0.1, factor_update_period=2, inverse_update_period=3)
    seen_a = []
    for k, (x, y) in enumerate(batches(6), start=1):
        assert opt.capture.active == (k % 2 == 1)
        opt.step(make_closure(opt, model, x, y))
        seen_a.append(opt.state["kfac"]["layers"][0]["A"].clone())
    assert opt.state["kfac"]["factor_updates"] == 3
    assert torch.equal(seen_a[0], seen_a[1]) and not torch.equal(seen_a[1], seen_a[2])
    # evaluation in grad mode on a non-factor step does not raise, on a factor step it would
    x, y = batches(1, seed=3)[0]
    assert opt.capture.active
    with torch.no_grad():
        model(x)  # ignored
    opt.step(make_closure(opt, model, x, y))


def test_plain_step_equals_closure_step():
    m1, m2 = mlp(2), mlp(2)
    o1 = KFAC(m1, lr=0.1, factor_update_period=1, inverse_update_period=2)
    o2 = KFAC(m2, lr=0.1, factor_update_period=1, inverse_update_period=2)
    for x, y in batches(3):
        loss = o1.step(make_closure(o1, m1, x, y))
        o2.zero_grad()
        loss2 = F.cross_entropy(m2(x), y)
        loss2.backward()
        assert o2.step() is None
        assert float(loss.detach()) == float(loss2.detach())
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("method, mode", [("eigen", "exact"), ("eigen", "factored"),
                                          ("cholesky", "factored")])
def test_steady_state_steps_do_not_sync(method, mode):
    """After the first step (first factors and inverses), no step converts a tensor to a Python
    value, including factor and inverse updates and KL-clipping; the counters still count."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 6),
                          nn.LayerNorm(6), nn.Linear(6, 3)).to(D)
    x, y = torch.randn(6, 2, 4, 4, dtype=D), torch.randint(0, 3, (6,))
    opt = KFAC(model, lr=10.0, factor_update_period=2, inverse_update_period=3,
               inverse_method=method, damping_mode=mode)
    opt.step(make_closure(opt, model, x, y))
    with no_host_sync():
        for _ in range(6):
            opt.step(make_closure(opt, model, x, y))
    d = opt.diagnostics()
    assert d["factor_updates"] == 4 and d["kl_clip_active"] == 7  # lr 10: always clipped


def test_sampled_fisher_uses_sampled_targets():
    torch.manual_seed(5)
    lin = nn.Linear(3, 2).to(D)
    x = torch.randn(6, 3, dtype=D)
    t = torch.randn(6, 2, dtype=D)
    opt = KFAC(lin, lr=0.0, factor_update_period=1, fisher="sampled", fisher_loss=sampled_mse)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (lin(x) - t).pow(2).sum(1).mean()
        loss.backward()
        return loss

    torch.manual_seed(99)
    opt.step(closure)
    torch.manual_seed(99)
    with torch.no_grad():
        z = lin(x)
        noise = torch.randn_like(z)
    g = -noise  # per-example ∂/∂z of ½‖z − (z + ε)‖² at sampled targets = −ε
    torch.testing.assert_close(opt.state["kfac"]["layers"][0]["G"], g.T @ g / 6)
    # .grad still holds the true-label gradient
    want = ((lin(x) - t) / 6).T @ x
    torch.testing.assert_close(lin.weight.grad, want.detach())


def test_unsupported_layers_train_with_sgd_fallback():
    torch.manual_seed(6)
    emb = nn.Embedding(10, 4).to(D)
    norm = nn.LayerNorm(4).to(D)
    head = nn.Linear(4, 3).to(D)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.norm, self.head = emb, norm, head

        def forward(self, i):
            return self.head(self.norm(self.emb(i)))

    net = Net()
    shadow = [p.detach().clone().requires_grad_() for p in (*emb.parameters(),
                                                             *norm.parameters())]
    sgd = torch.optim.SGD(shadow, lr=0.05, momentum=0.9, weight_decay=1e-3)
    with pytest.warns(UserWarning, match=r"only 23\.8% of the trainable parameters"):
        opt = KFAC(net, lr=0.05, weight_decay=1e-3, factor_update_period=1,
                   inverse_update_period=1)
    assert [g["kind"] for g in opt.param_groups] == ["kronecker", "fallback"]
    cov = opt.coverage()
    assert cov["kronecker"] == {"head": head.weight.numel() + head.bias.numel()}
    assert cov["first_order"] == {name: p.numel() for name, p in net.named_parameters()
                                  if not name.startswith("head")}
    g = torch.Generator().manual_seed(0)
    i, y = torch.randint(0, 10, (16,), generator=g), torch.randint(0, 3, (16,), generator=g)
    losses = []
    for _ in range(15):
        losses.append(float(opt.step(make_closure(opt, net, i, y)).detach()))
        for sp, p in zip(shadow, (*emb.parameters(), *norm.parameters())):
            sp.grad = p.grad.clone()
        sgd.step()
        for sp, p in zip(shadow, (*emb.parameters(), *norm.parameters())):
            torch.testing.assert_close(sp.detach(), p.detach(), rtol=1e-12, atol=1e-14)
    assert losses[-1] < losses[0]


def run_steps(model, opt, data):
    return [float(opt.step(make_closure(opt, model, x, y)).detach()) for x, y in data]


@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_exact_resume_into_fresh_model(method):
    data = batches(8)
    kw = dict(lr=0.2, damping=0.05, factor_update_period=2, inverse_update_period=3,
              inverse_method=method)
    m_full = mlp(7)
    o_full = KFAC(m_full, **kw)
    full = run_steps(m_full, o_full, data)

    m_a = mlp(7)
    o_a = KFAC(m_a, **kw)
    run_steps(m_a, o_a, data[:5])
    buf = io.BytesIO()
    torch.save({"model": m_a.state_dict(), "opt": o_a.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m_b = mlp(123)
    m_b.load_state_dict(ck["model"])
    o_b = KFAC(m_b, **kw)
    o_b.load_state_dict(ck["opt"])
    rest = run_steps(m_b, o_b, data[5:])
    assert rest == full[5:]
    for p1, p2 in zip(m_full.parameters(), m_b.parameters()):
        assert torch.equal(p1, p2)
    # loaded state is a copy, not an alias of the checkpoint (the first layer's state sits in
    # the entry of its weight, parameter 0)
    assert o_b.state["kfac"]["layers"][0]["A"].data_ptr() != \
        ck["opt"]["state"][0]["kfac_A"].data_ptr()


def test_load_rejects_other_architecture():
    o1 = KFAC(mlp(), lr=0.1)
    o2 = KFAC(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(D), lr=0.1)
    with pytest.raises(ValueError, match="does not match"):
        o2.load_state_dict(o1.state_dict())


def test_non_finite_statistics_rejected_and_counted():
    model = mlp()
    opt = KFAC(model, lr=0.0, factor_update_period=1, inverse_update_period=1)
    x, y = batches(1)[0]
    opt.step(make_closure(opt, model, x, y))
    before = [ls["A"].clone() for ls in opt.state["kfac"]["layers"]]
    bad = x.clone()
    bad[0, 0] = float("inf")
    opt.step(make_closure(opt, model, bad, y))
    after = opt.state["kfac"]["layers"]
    assert torch.equal(after[0]["A"], before[0]) and torch.isfinite(after[0]["A_inv"]).all()
    assert opt.diagnostics()["stats_rejected_per_layer"][0] == 1


def test_lr_scheduler_drives_lr():
    model = mlp()
    opt = KFAC(model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    opt.step(make_closure(opt, model, x, y))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_step_without_forward_changes_nothing():
    """As torch.optim: no gradients, no update; no data, no curvature update."""
    model = mlp()
    opt = KFAC(model, lr=0.1)
    before = [p.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    ls = opt.state["kfac"]["layers"][0]
    assert torch.equal(ls["A"], torch.eye(ls["A"].shape[0]))


@pytest.mark.parametrize("kw, name", [
    (dict(lr=-1.0), "lr=-1.0"), (dict(damping=0.0), "damping=0.0"),
    (dict(momentum=1.0), "momentum=1.0"), (dict(factor_decay=1.5), "factor_decay=1.5"),
    (dict(factor_update_period=0), "factor_update_period=0"),
    (dict(inverse_update_period=2.5), "inverse_update_period=2.5"),
    (dict(kl_clip=-1.0), "kl_clip=-1.0"), (dict(inverse_method="svd"), "inverse_method='svd'"),
    (dict(damping_mode="exact", inverse_method="cholesky"), "damping_mode='exact'"),
    (dict(fisher="sampled"), "fisher_loss=None"), (dict(weight_decay=-1), "weight_decay=-1"),
    (dict(compile="no-such-backend"), "compile='no-such-backend'"),
])
def test_bad_arguments(kw, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(").replace(".", r"\.")):
        KFAC(mlp(), **kw)



def _compiled_run(compile, kw, steps=14):
    """Two layer groups (their own lr and damping), factors every 2 steps, inverses every 5,
    an LR scheduler, ``zero_grad`` alternately setting ``None`` and zeroing; returns the final
    parameters and the steps at which a graph was compiled."""
    model = mlp()
    opt = KFAC(model, lr=0.05, damping=0.1, factor_update_period=2, inverse_update_period=5,
               param_groups=[{"modules": [model[2]], "lr": 0.02, "damping": 0.2}],
               compile=compile, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.6)
    compiled_at = []
    for k, (x, y) in enumerate(batches(steps), start=1):
        before = len(GRAPHS)
        opt.zero_grad(set_to_none=k % 2 == 0)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        if len(GRAPHS) > before:
            compiled_at.append(k)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), compiled_at


@pytest.mark.parametrize("kw", [{}, {"damping_mode": "exact", "kl_clip": None},
                                {"inverse_method": "cholesky", "weight_decay": 1e-2}])
def test_compiled_step_equals_eager_and_compiles_once(kw):
    """``compile=backend``: the per-step math of all the layers (directions, KL clip,
    momentum, update) is one graph (``fullgraph``), compiled in the first step and never
    again across factor and inverse updates, a decaying learning rate and ``zero_grad`` both
    ways; the iterates equal eager's."""
    eager, _ = _compiled_run(False, kw)
    compiled, compiled_at = _compiled_run(COUNTING, kw)
    assert compiled_at == [1]
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)
