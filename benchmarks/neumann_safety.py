"""Safety grid for the Neumann optimizer: does it train wherever SGD with Nesterov momentum does?

For every cell learning rate × warm-up × gradient clipping × problem × seed, three short runs
from the same initialisation and batch order:

* ``sgd``: ``torch.optim.SGD(lr, momentum=0.9, nesterov=True)``;
* ``neumann``: ``secant.Neumann(params, lr)``, the library defaults (bounded regulariser,
  gradient growth guard);
* ``paper``: ``secant.Neumann(params, lr, regularizer="paper", grad_growth=None)``, the paper's
  literal algorithm (unbounded regulariser, no gradient growth guard).

A run *trains* when its loss on a fixed evaluation batch after the last step is finite and
below the loss at the start (Neumann evaluated at its undisplaced weights). Warm-up is
``LinearLR(start_factor=0.01, total_iters=50)``; clipping is ``clip_grad_norm_(params, 1.0)``
before every step. Problems: the harness's digits classifier (64-128-64-10 MLP), a small CNN
(2 conv layers with BatchNorm, 8x8 digits), the digits autoencoder, the noisy quadratic, and
the harness's CURVES autoencoder on a 1,000-image subset. BatchNorm models are evaluated in
training mode (batch statistics of the evaluation batch) so start and end are comparable.

Usage: python benchmarks/neumann_safety.py [--steps 200] [--seeds 0 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import time

import torch
from report_out import emit
from torch import nn

from secant import Neumann
from secant.bench import data as D
from secant.bench.problems import get_problem

LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
OPTS = ("sgd", "neumann", "paper")


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def load_problems() -> dict[str, tuple]:
    """name: (model builder, loss(model, x, y), x, y, batch size)."""
    clf = get_problem("digits-clf")
    dclf = clf.load(None, False)
    ae = get_problem("digits")
    quad = get_problem("quadratic")
    dquad = quad.load(None, False)
    curves = get_problem("curves")
    xc = D.curves_images(1000, seed=0)
    return {
        "digits-clf": (clf.build, clf.loss, dclf.x_train, dclf.y_train, 100),
        "cnn": (small_cnn, clf.loss, dclf.x_train, dclf.y_train, 100),
        "digits-ae": (ae.build, ae.loss, dclf.x_train, None, 100),
        "quadratic": (quad.build, quad.loss, dquad.x_train, None, 128),
        "curves": (curves.build, curves.loss, xc, None, 50),
    }


def make_opt(name: str, params, lr: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if name == "neumann":
        return Neumann(params, lr=lr)
    return Neumann(params, lr=lr, regularizer="paper", grad_growth=None)


def run(problem, opt_name: str, lr: float, warmup: bool, clip: bool, seed: int,
        steps: int) -> tuple[float, float]:
    build, loss_fn, x, y, batch = problem
    torch.manual_seed(seed)
    model = build()
    params = list(model.parameters())
    opt = make_opt(opt_name, params, lr)
    sched = (torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=50)
             if warmup else None)
    gen = torch.Generator().manual_seed(1000 + seed)
    ex, ey = x[:500], None if y is None else y[:500]

    def evaluate() -> float:
        with torch.no_grad():
            if isinstance(opt, Neumann):
                with opt.undisplaced():
                    return float(loss_fn(model, ex, ey))
            return float(loss_fn(model, ex, ey))

    start = evaluate()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        opt.zero_grad()
        loss_fn(model, x[idx], None if y is None else y[idx]).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if sched is not None:
            sched.step()
    return start, evaluate()


def trains(start: float, end: float) -> bool:
    return math.isfinite(end) and end < start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--problems", nargs="+", default=None)
    ap.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    ap.add_argument("--out", default=None, help="write the markdown result here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    problems = load_problems()
    names = args.problems or list(problems)
    t0, c0 = time.time(), time.process_time()
    results = {}  # (problem, lr, warmup, clip, seed, opt) -> (start, end)
    for pname in names:
        tp = time.time()
        for lr, warmup, clip, seed in itertools.product(args.lrs, (False, True), (False, True),
                                                        args.seeds):
            for oname in OPTS:
                results[(pname, lr, warmup, clip, seed, oname)] = run(
                    problems[pname], oname, lr, warmup, clip, seed, args.steps)
        print(f"{pname}: {time.time() - tp:.0f} s", flush=True)
    wall, cpu = time.time() - t0, time.process_time() - c0

    lines = [f"Machine: {platform.machine()}, 1 torch thread, torch {torch.__version__}; "
             f"{args.steps} steps per run, seeds {args.seeds}; total CPU time {cpu:.0f} s, "
             f"wall time {wall:.0f} s", ""]
    n_sgd = n_bad = n_bad_paper = 0
    for pname in names:
        lines += [f"### {pname}", "",
                  "Runs that train (end below start), of "
                  f"{len(args.seeds)} seeds, as SGD-Nesterov / Neumann default / paper form; "
                  "`!` marks a seed where SGD trains and Neumann default does not.", "",
                  "| lr | plain | LinearLR warm-up | clip 1.0 | warm-up + clip |",
                  "|---|---|---|---|---|"]
        for lr in args.lrs:
            row = [f"{lr:g}"]
            for warmup, clip in ((False, False), (True, False), (False, True), (True, True)):
                ok = {o: [trains(*results[(pname, lr, warmup, clip, s, o)]) for s in args.seeds]
                      for o in OPTS}
                bad = sum(a and not b for a, b in zip(ok["sgd"], ok["neumann"]))
                n_sgd += sum(ok["sgd"])
                n_bad += bad
                n_bad_paper += sum(a and not b for a, b in zip(ok["sgd"], ok["paper"]))
                row.append("/".join(str(sum(ok[o])) for o in OPTS) + (" !" * bad))
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Loss at the start and median loss after the last step (plain setting: no "
                  "warm-up, no clipping):", "",
                  "| lr | start | SGD-Nesterov | Neumann default | paper form |",
                  "|---|---|---|---|---|"]
        for lr in args.lrs:
            start = results[(pname, lr, False, False, args.seeds[0], "sgd")][0]
            ends = [statistics.median(results[(pname, lr, False, False, s, o)][1]
                                      for s in args.seeds) for o in OPTS]
            lines.append(f"| {lr:g} | {start:.4g} | " + " | ".join(f"{e:.4g}" for e in ends)
                         + " |")
        worst = max(results[(pname, lr, w, c, s, "paper")][1] / results[(pname, lr, w, c, s,
                    "paper")][0] for lr in args.lrs for w in (False, True)
                    for c in (False, True) for s in args.seeds)
        lines += ["", f"Largest end/start loss ratio of the paper form: {worst:.3g}", ""]
    head = [f"**Neumann default ends above start where SGD-Nesterov trains: {n_bad} of {n_sgd} "
            f"runs.** Paper form: {n_bad_paper} of {n_sgd}.", ""]
    text = "\n".join(lines[:2] + head + lines[2:])
    emit(text, args.out)


if __name__ == "__main__":
    main()
