"""CPU iteration time of the Kronecker-factored optimizers relative to SGD with momentum, and
their optimizer-state memory, on the MNIST autoencoder of the K-BFGS paper at batch 1000.

Model: 784-1000-500-250-30-250-500-1000-784 (ReLU, linear code layer; 2,837,314 parameters),
sigmoid-BCE summed over pixels. Data: random MNIST-shaped batches in [0, 1] (timing does not
depend on the values; no download). Every method is driven as ``loss = opt.step(closure)``.

Timing: methods are interleaved round by round (so machine noise hits all of them alike); a
round runs ``--steps`` consecutive steps of one method (default 20 = one K-FAC inverse period, so
every K-FAC round contains exactly one inverse update) after ``--warmup`` untimed steps at the
start. The reported time per iteration is the median over rounds of round time / steps; ratios
are medians divided by the SGD median of the same run.

    python benchmarks/kronecker_speed.py --rounds 3 --steps 20 --threads 2 --out results.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from secant import KBFGS, KBFGSL, KFAC
from secant.bench.models import MNIST_WIDTHS, autoencoder
from secant.bench.runner import state_bytes


def make(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "SGD-momentum":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if name == "K-FAC (eigen)":
        return KFAC(model, lr=1e-3, damping=1.0, factor_update_period=1,
                    inverse_update_period=20, inverse_method="eigen")
    if name == "K-FAC (cholesky)":
        return KFAC(model, lr=1e-3, damping=1.0, factor_update_period=1,
                    inverse_update_period=20, inverse_method="cholesky")
    if name == "K-BFGS":
        return KBFGS(model, lr=0.05, damping=0.3)
    if name == "K-BFGS(L)":
        return KBFGSL(model, lr=0.05, damping=0.3, history_size=100)
    raise ValueError(name)


METHODS = ["SGD-momentum", "K-FAC (eigen)", "K-FAC (cholesky)", "K-BFGS", "K-BFGS(L)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, MNIST_WIDTHS[0])
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer, Callable]] = {}
    for name in METHODS:
        torch.manual_seed(0)
        model = autoencoder(MNIST_WIDTHS)
        opt = make(name, model)

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(x), x, reduction="sum") / len(x)
            loss.backward()
            return loss

        for _ in range(args.warmup):
            opt.step(closure)
        runs[name] = (model, opt, closure)
    times: dict[str, list[float]] = {n: [] for n in METHODS}
    for _ in range(args.rounds):
        for name in METHODS:
            _, opt, closure = runs[name]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = opt.step(closure)
            float(loss.detach())  # wait for the last step
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["SGD-momentum"])
    n_params = sum(p.numel() for p in runs["SGD-momentum"][0].parameters())
    lines = [
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}; "
        f"python {platform.python_version()}",
        f"model: MNIST autoencoder {'-'.join(map(str, MNIST_WIDTHS))} ({n_params:,} parameters), "
        f"batch {args.batch}",
        f"rounds {args.rounds} x {args.steps} steps per method (interleaved), "
        f"warm-up {args.warmup} steps",
        "",
        "| method | median s/iter | all rounds s/iter | ratio to SGD-momentum | "
        "optimizer state MiB | state / #params (floats) |",
        "|---|---|---|---|---|---|",
    ]
    for name in METHODS:
        med = statistics.median(times[name])
        opt = runs[name][1]
        sb = state_bytes(opt)
        rounds = ", ".join(f"{t:.3f}" for t in times[name])
        lines.append(f"| {name} | {med:.3f} | {rounds} | {med / base:.2f}x | "
                     f"{sb / 2**20:.1f} | {sb / 4 / n_params:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
