"""Why ``MomentumLBFGS(step_rule="kl_clip")`` can raise the loss where SGD with the same lr and
momentum lowers it (issue 18): controlled runs on the least-squares problem of PyTorch's own
optimizer tests (``loss = ‖W i + b‖²``, W 10×5, b 10, one random input i: a rank-one Hessian per
output row), curvature from step 2 (``update_period=1``), 8 seeds.

Hypothesis: once the clip is active, ``ν = sqrt(κ / (η² gᵀd))`` makes the clipped direction's
length ``sqrt(κ · dᵀd / gᵀd) / η`` independent of the gradient's size, so the momentum buffer is
driven by a force of constant magnitude that does not fade near the minimum; heavy-ball momentum
μ turns that into an oscillation of amplitude about ``η‖νd‖ / (1 − μ)²`` around the minimum
instead of convergence. The clip switches off only once ``‖g‖ < sqrt(κ gᵀg / gᵀd) / η``, so a
smaller κ keeps it on longer. Checks: the clipped length stays at its prediction over a run; the
damage grows with μ and vanishes with μ = 0; a smaller κ does not help; SGD and ``grad_norm``
(step proportional to ‖g‖) do not show it.

Run: python benchmarks/mlbfgs_kl_clip.py --out benchmarks/mlbfgs_kl_clip.md
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from report_out import emit

from secant import MomentumLBFGS

SEEDS = range(8)


def problem(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 5, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(10, generator=g, dtype=torch.float64).requires_grad_()
    i = torch.randn(5, generator=g, dtype=torch.float64)
    return [w, b], lambda: (w.mv(i) + b).pow(2).sum()


def make(params, lr, spec):
    kind, mu, kappa = spec
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=mu)
    return MomentumLBFGS(params, lr=lr, momentum=mu, update_period=1, step_rule=kind,
                         kl_clip=kappa)


def clipped_lengths(opt):
    """Wrap the step rule to record, per step, ‖ν d‖, ‖g‖ and the prediction
    ``sqrt(κ dᵀd / gᵀd) / η`` from the unclipped direction ``d``."""
    seen = []
    inner = opt._precondition

    def record(d):
        rows = opt._layout.curvature_rows
        g = d[:rows].clone()
        free = d.clone()  # the unclipped direction, from the same (pure) preconditioning
        rule, opt.step_rule = opt.step_rule, "none"
        inner(free)
        opt.step_rule = rule
        inner(d)
        u, lr = free[:rows], opt.param_groups[0]["lr"]
        predicted = (opt.kl_clip * float((u * u).sum()) / float((g * u).sum())) ** 0.5 / lr
        seen.append((float(d[:rows].norm()), float(g.norm()), predicted))
    opt._precondition = record
    return seen


def run(spec, seed, lr, steps, trace=False):
    params, loss = problem(seed)
    opt = make(params, lr, spec)
    seen = clipped_lengths(opt) if trace else None
    start = float(loss().detach())
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return float(loss().detach()) / start, seen


CONTENDERS = {
    "SGD, μ 0.9": ("sgd", 0.9, None),
    "grad_norm, μ 0.9": ("grad_norm", 0.9, 1e-3),
    "none, μ 0.9": ("none", 0.9, 1e-3),
    "kl_clip κ 1e-3, μ 0.9 (the failing setting)": ("kl_clip", 0.9, 1e-3),
    "kl_clip κ 1e-3, μ 0.5": ("kl_clip", 0.5, 1e-3),
    "kl_clip κ 1e-3, μ 0": ("kl_clip", 0.0, 1e-3),
    "kl_clip κ 1e-4, μ 0.9": ("kl_clip", 0.9, 1e-4),
    "kl_clip κ 1e-5, μ 0.9": ("kl_clip", 0.9, 1e-5),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = ["# Why step_rule=\"kl_clip\" can raise the loss (MomentumLBFGS)", "",
             "Command: `python benchmarks/mlbfgs_kl_clip.py --out benchmarks/mlbfgs_kl_clip.md`",
             f"Machine: {platform.machine()}, Python {platform.python_version()}, torch "
             f"{torch.__version__}, float64, 1 thread; 8 seeds of the least-squares problem "
             "of PyTorch's optimizer tests; `update_period=1`.", "",
             "Final loss / initial loss: median [max] over the 8 seeds, and how many seeds end "
             "above their start.", "",
             "| contender | lr 0.01, 20 steps | lr 0.1, 20 steps | lr 0.1, 200 steps |",
             "|---|---|---|---|"]
    for name, spec in CONTENDERS.items():
        cells = []
        for lr, steps in ((0.01, 20), (0.1, 20), (0.1, 200)):
            ratios = [run(spec, s, lr, steps)[0] for s in SEEDS]
            cells.append(f"{statistics.median(ratios):.3g} [{max(ratios):.3g}], "
                         f"{sum(r > 1 for r in ratios)}/8 up")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Length of the clipped direction ‖νd‖ and of the gradient ‖g‖ over one run "
              "(seed 0, lr 0.1, κ 1e-3, μ 0.9; steps 2–20, every 3rd):", "",
              "| step | ‖νd‖ | ‖g‖ | sqrt(κ dᵀd / gᵀd) / η (the length while clipped) |",
              "|---|---|---|---|"]
    _, seen = run(CONTENDERS["kl_clip κ 1e-3, μ 0.9 (the failing setting)"], 0, 0.1, 20,
                  trace=True)
    for k, (dn, gn, predicted) in enumerate(seen):
        if k % 3 == 0:
            lines.append(f"| {k + 2} | {dn:.4g} | {gn:.4g} | {predicted:.4g} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
