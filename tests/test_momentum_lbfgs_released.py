"""MomentumLBFGS.released against an independent dense float64 re-implementation of the
authors' released block optimizer (docs/momentum_lbfgs.md, "Released-code mode"): several
blocks, parameters in no block, weight decay, pair momentum, un-normalised and reset averages,
global-norm normalisation, heavy-ball momentum."""

import pytest
import torch
from torch import nn

from secant import MomentumLBFGS

SIZES = [3, 4, 2, 5, 3, 4]  # parameter tensors; 0 ("stem") and 5 ("classifier") in no block
BLOCKS = [[1, 2], [3], [4]]


def problem(n, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-2, 0, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    noise = 0.05 * torch.randn(steps, n, generator=gen, dtype=torch.float64)
    return lambda x, t: a @ x - b + noise[t - 1]


def released_reference(x0, grad_fn, steps, lr, mu, wd, beta, mmm, T, m, damping=0.01,
                       sigma_l=0.01, sigma_h=1.5, eps=1e-12):
    """Dense float64 transcription of the released block optimizer, one parameter group."""
    bounds = torch.cumsum(torch.tensor([0] + SIZES), 0).tolist()
    idx = [torch.arange(bounds[i], bounds[i + 1]) for i in range(len(SIZES))]
    bidx = [torch.cat([idx[i] for i in blk]) for blk in BLOCKS]
    free = torch.cat([idx[0], idx[5]])
    x = x0.clone()
    buf = None
    avg_p, avg_g, snap_p, snap_g = ([None] * len(BLOCKS) for _ in range(4))
    pairs = [[] for _ in BLOCKS]
    started = False
    for t in range(1, steps + 1):
        g = grad_fn(x, t)
        for b, ib in enumerate(bidx):
            gb = g[ib] + wd * g[ib]  # the released code decays the gradient itself here
            if t == 1:
                avg_p[b], avg_g[b] = x[ib].clone(), gb.clone()
                continue
            avg_p[b] = beta * avg_p[b] + x[ib]
            avg_g[b] = beta * avg_g[b] + gb
            if t % T:
                continue
            if snap_p[b] is not None:
                s, y = avg_p[b] - snap_p[b], avg_g[b] - snap_g[b]
                if pairs[b]:
                    s = (1 - mmm) * s + mmm * pairs[b][-1][0]
                    y = (1 - mmm) * y + mmm * pairs[b][-1][1]
                r = (s @ y) / (s @ s + eps)
                phi = 1.0
                if r < sigma_l:
                    phi = (1 - sigma_l) / (1 - r)
                elif r > sigma_h:
                    phi = (sigma_h - 1) / (r - 1)
                phi = min(phi, 1 - damping)
                pairs[b] = (pairs[b] + [(s, phi * y + (1 - phi) * s)])[-m:]
                started = True
            snap_p[b], snap_g[b] = avg_p[b].clone(), avg_g[b].clone()
            avg_g[b] = gb.clone()
        if started:
            d = g.clone()  # parameters in no block: raw gradient, no weight decay
            for b, ib in enumerate(bidx):
                s_n, y_n = pairs[b][-1]
                eye = torch.eye(len(ib), dtype=x.dtype)
                h = (s_n @ y_n) / (y_n @ y_n + eps) * eye
                for s, y in pairs[b]:
                    rho = 1 / (s @ y)
                    left = eye - rho * torch.outer(s, y)
                    h = left @ h @ left.T + rho * torch.outer(s, s)
                d[ib] = h @ (g[ib] + wd * x[ib])
            d = d / torch.sqrt(sum(d[ib] @ d[ib] for ib in bidx))
            assert d[free].abs().sum() > 0
        else:
            d = g + wd * x
        buf = d.clone() if buf is None else mu * buf + d
        x = x - lr * buf
    return x


def run_secant(x0, grad_fn, steps, **kw):
    params = [nn.Parameter(c.clone()) for c in torch.split(x0, SIZES)]
    opt = MomentumLBFGS.released(params, blocks=[[params[i] for i in b] for b in BLOCKS], **kw)
    for t in range(1, steps + 1):
        g = grad_fn(torch.cat([p.detach() for p in params]), t)
        for p, gp in zip(params, torch.split(g, SIZES)):
            p.grad = gp.clone()
        opt.step()
    return torch.cat([p.detach() for p in params]), opt.diagnostics()


@pytest.mark.parametrize("beta,T", [(0.999, 5), (0.9, 3)])
def test_released_matches_dense_transcription(beta, T):
    n, steps = sum(SIZES), 80
    grad_fn = problem(n, steps)
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, beta=beta, update_period=T,
              history_size=4, pair_momentum=0.9)
    x, diag = run_secant(x0, grad_fn, steps, **hp, chunk_size=2)
    ref = released_reference(x0, grad_fn, steps, hp["lr"], hp["momentum"], hp["weight_decay"],
                             beta, hp["pair_momentum"], T, hp["history_size"])
    moved = (ref - x0).norm()
    assert moved > 0.1
    assert float((x - ref).norm() / ref.norm()) < 1e-12
    assert diag["pairs_accepted_per_block"] == [steps // T - 1] * len(BLOCKS)
    assert diag["history_length"] == [4] * len(BLOCKS)
    # The released weight-decay feed matters at this precision: without it the runs differ.
    params = [nn.Parameter(c.clone()) for c in torch.split(x0, SIZES)]
    plain = MomentumLBFGS(params, **hp, blocks=[[params[i] for i in b] for b in BLOCKS],
                          step_rule="unit", ema_normalized=False, grad_ema_reset=True,
                          curvature_eps=1e-12)
    for t in range(1, steps + 1):
        g = grad_fn(torch.cat([p.detach() for p in params]), t)
        for p, gp in zip(params, torch.split(g, SIZES)):
            p.grad = gp.clone()
        plain.step()
    assert float((torch.cat([p.detach() for p in params]) - ref).norm() / ref.norm()) > 1e-9


def test_released_refuses_update_period_one():
    with pytest.raises(ValueError, match="update_period"):
        MomentumLBFGS.released([nn.Parameter(torch.zeros(3))], update_period=1)


def test_parameters_in_no_block_warm_up_as_sgd():
    """Before the first pair every parameter, blocked or not, follows torch.optim.SGD."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    ref.load_state_dict(net.state_dict())
    opt = MomentumLBFGS(net.parameters(), lr=0.1, weight_decay=1e-2, update_period=4,
                        blocks=[[net[0].weight]])
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for _ in range(7):
        for m, o in ((net, opt), (ref, sgd)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
