"""Which step rule (and block layout, EMA factor) makes MomentumLBFGS robust across learning rates?

Two problems, each run for a fixed number of steps with every LR of a log grid:

* ``lsq``: noisy linear least squares, 20 features with scales 10^-2..10^0 (Hessian condition
  number 1e4), every feature contributing equally to the target, batch 64, label noise 0.1
  (noise floor 0.005).
* ``digits``: an MLP 64-64-10 classifier on scikit-learn's bundled 8x8 digits, batch 64.

Reported per variant: the final full-batch training loss at every LR of the grid (median over
seeds; "div" = non-finite or above the initial loss), the best of them, and the number of
diverged LRs. SGD with momentum 0.9 on the same grid is the baseline.

Run: python benchmarks/mlbfgs_step_rule.py > benchmarks/mlbfgs_step_rule.md
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics

import torch
from torch import nn

from secant import MomentumLBFGS

LRS = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]


def lsq_problem(seed):
    gen = torch.Generator().manual_seed(seed)
    n, samples = 20, 4096
    scales = torch.logspace(-2, 0, n)
    x = torch.randn(samples, n, generator=gen) * scales
    y = x @ (torch.randn(n, generator=gen) / scales) + 0.1 * torch.randn(samples, generator=gen)
    model = nn.Linear(n, 1, bias=False)
    nn.init.zeros_(model.weight)
    return model, x, y.unsqueeze(1), lambda out, t: 0.5 * (out - t).square().mean()


def digits_problem(seed):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return model, x, y, nn.functional.cross_entropy


PROBLEMS = {"lsq": lsq_problem, "digits": digits_problem}


def run(problem, seed, make_opt, lr, steps, batch=64):
    model, x, y, loss_fn = PROBLEMS[problem](seed)
    opt = make_opt(model.parameters(), lr)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        initial = float(loss_fn(model(x), y))
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    return final if math.isfinite(final) and final <= initial else math.inf


def variants(T):
    out = {"SGD momentum 0.9": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)}
    for beta in (0.999, 0.9):
        for rule in ("none", "unit", "kl_clip", "grad_norm"):
            out[f"mL-BFGS rule={rule} beta={beta}"] = (
                lambda p, lr, rule=rule, beta=beta: MomentumLBFGS(
                    p, lr=lr, beta=beta, update_period=T, history_size=10, step_rule=rule,
                    blocks="tensor"))
    for beta in (0.999, 0.9):
        out[f"mL-BFGS rule=grad_norm beta={beta} blocks=group"] = (
            lambda p, lr, beta=beta: MomentumLBFGS(p, lr=lr, beta=beta, update_period=T,
                                                   history_size=10, step_rule="grad_norm",
                                                   blocks="group"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--update-period", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("# MomentumLBFGS step rule, EMA factor and blocks across an LR grid\n")
    print(f"- machine: {platform.machine()} CPU, {platform.system()}, 1 thread; "
          f"torch {torch.__version__}, Python {platform.python_version()}")
    print(f"- command: `python benchmarks/mlbfgs_step_rule.py --steps {args.steps} "
          f"--seeds {args.seeds} --update-period {args.update_period}`")
    print(f"- steps {args.steps}, batch 64, T = {args.update_period}, m = 10, "
          f"LR grid {LRS}, median over {args.seeds} seeds\n")
    for problem in PROBLEMS:
        print(f"## {problem}\n")
        print("| variant | best | diverged | " + " | ".join(f"lr={lr:g}" for lr in LRS) + " |")
        print("|---" * (len(LRS) + 3) + "|")
        for name, make in variants(args.update_period).items():
            losses = [statistics.median(run(problem, s, make, lr, args.steps)
                                        for s in range(args.seeds)) for lr in LRS]
            diverged = sum(not math.isfinite(v) for v in losses)
            cells = " | ".join(f"{v:.3g}" if math.isfinite(v) else "div" for v in losses)
            print(f"| {name} | {min(losses):.4g} | {diverged} | {cells} |", flush=True)
        print()


if __name__ == "__main__":
    main()
