"""Large-batch scaling of the Neumann optimizer against SGD with momentum and Adam.

Steps to a fixed target loss at batch B and 8B, each optimizer with its best learning rate
from a grid, on two problems:

* ``quadratic``: a DeepOBS ``quadratic_deep``-like noisy quadratic in 100 dimensions,
  ``ℓ(θ; x) = ½ (θ − x)ᵀ H (θ − x)`` with ``x ~ N(0, I)`` per example and a rotated ``H`` with
  90 eigenvalues in [0, 1] and 10 in [30, 60]; the loss tracked is the expected excess loss
  ``½ θᵀ H θ`` (exact, no evaluation noise).
* ``curves``: a small CURVES-like autoencoder (784-128-32-8-32-128-784, ReLU, sigmoid output,
  binary cross-entropy) on 28×28 images of smooth curves through 3 random points, generated
  here (seeded); the loss tracked is the mean BCE on a fixed 1024-image training subset.

Neumann runs twice, with the library's defaults (``neumann``: bounded regulariser, gradient
growth guard) and the paper's literal algorithm (``neumann_paper``: ``regularizer="paper",
grad_growth=None``), both with the paper's Table 1 (α = 1e-7, β = 1e-5·n, γ = 0.99,
μ 0.5 → 0.9) and its epoch schedule (5 epochs SGD burn-in, resets after 10 epochs doubling,
μ unit 1 epoch) via ``Neumann.paper_periods``, with an epoch of 4096 examples for both
problems; its loss is measured at the undisplaced weights (``opt.undisplaced()``).

Usage: python benchmarks/neumann_large_batch.py [--quick] [--out benchmarks/neumann_large_batch.md]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
from report_out import emit
from torch import nn

from secant import Neumann

EPOCH = 4096  # examples per "epoch" for the paper's epoch-based Neumann schedule


# ---------------------------------------------------------------- problems
def curves_images(n: int, seed: int) -> torch.Tensor:
    """n 28×28 images in [0, 1]: a parabola-like curve through 3 random points, blurred."""
    gen = torch.Generator().manual_seed(seed)
    pts = 4 + 20 * torch.rand(n, 3, 2, generator=gen)  # 3 points in pixel coordinates
    s = torch.linspace(0, 1, 64)
    # quadratic Lagrange interpolation through the points at s = 0, 1/2, 1
    basis = torch.stack([2 * (s - 0.5) * (s - 1), -4 * s * (s - 1), 2 * s * (s - 0.5)], 1)
    curve = torch.einsum("sk,nkd->nsd", basis, pts)  # [n, 64, 2]
    grid = torch.stack(torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij"), -1)
    out = []
    for chunk in curve.split(512):
        d2 = ((grid.reshape(1, 784, 1, 2) - chunk.unsqueeze(1)) ** 2).sum(-1)
        out.append(torch.exp(-d2.min(-1).values / (2 * 0.8**2)))
    return torch.cat(out)


class Curves:
    name = "curves"

    def __init__(self, seed: int):
        self.data = curves_images(EPOCH, seed)
        self.eval_x = self.data[:1024]
        torch.manual_seed(seed)
        sizes = [784, 128, 32, 8, 32, 128, 784]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2 and b != 8:
                layers.append(nn.ReLU())
        self.model = nn.Sequential(*layers)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def params(self):
        return list(self.model.parameters())

    def loss(self, batch: int) -> torch.Tensor:
        x = self.data[torch.randint(len(self.data), (batch,), generator=self.gen)]
        return nn.functional.binary_cross_entropy_with_logits(self.model(x), x)

    @torch.no_grad()
    def eval_loss(self) -> float:
        x = self.eval_x
        return float(nn.functional.binary_cross_entropy_with_logits(self.model(x), x))


class Quadratic:
    name = "quadratic"

    def __init__(self, seed: int, dim: int = 100):
        gen = torch.Generator().manual_seed(seed)
        eig = torch.cat([torch.rand(dim - dim // 10, generator=gen),
                         30 + 30 * torch.rand(dim // 10, generator=gen)])
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        self.h = q @ torch.diag(eig) @ q.T
        self.theta = nn.Parameter(torch.ones(dim))
        self.gen = torch.Generator().manual_seed(seed + 1)

    def params(self):
        return [self.theta]

    def loss(self, batch: int) -> torch.Tensor:
        x = torch.randn(batch, self.theta.numel(), generator=self.gen)
        r = self.theta - x
        return 0.5 * ((r @ self.h) * r).sum(1).mean()

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(0.5 * self.theta @ self.h @ self.theta)


# ---------------------------------------------------------------- runs
def make_opt(name: str, params, lr: float, batch: int):
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name in ("neumann", "neumann_paper"):
        literal = {"regularizer": "paper", "grad_growth": None} if name == "neumann_paper" else {}
        return Neumann(params, lr=lr, **literal,
                       **Neumann.paper_periods(max(1, EPOCH // batch)))
    raise ValueError(name)


def steps_to_target(problem, opt_name, lr, batch, seed, target, max_steps, every):
    prob = problem(seed)
    opt = make_opt(opt_name, prob.params(), lr, batch)

    def evaluate():
        if hasattr(opt, "undisplaced"):
            with opt.undisplaced():
                return prob.eval_loss()
        return prob.eval_loss()

    for step in range(1, max_steps + 1):
        opt.zero_grad()
        prob.loss(batch).backward()
        opt.step()
        if step % every == 0:
            val = evaluate()
            if not math.isfinite(val) or val > 1e6:
                return None  # diverged
            if val <= target:
                return step
    return None


SETTINGS = {
    # problem: (class, base batch B, target loss, max steps at B, max steps at 8B, eval every,
    #           lr grids per optimizer, seeds)
    "quadratic": (Quadratic, 32, 2.0, 1500, 800, 5, {
        "sgd_momentum": [1e-3, 3e-3, 1e-2],
        "adam": [1e-2, 3e-2, 1e-1],
        "neumann": [3e-3, 1e-2, 3e-2],
        "neumann_paper": [3e-3, 1e-2, 3e-2],
    }, [0, 1, 2]),
    "curves": (Curves, 32, 0.16, 1000, 500, 10, {
        "sgd_momentum": [1.0, 3.0, 10.0],
        "adam": [3e-3, 1e-2, 3e-2],
        "neumann": [0.3, 1.0, 3.0],
        "neumann_paper": [0.3, 1.0, 3.0],
    }, [0, 1]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--problems", nargs="+", default=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = []
    t_start = time.time()
    for pname in args.problems:
        cls, base, target, max_b, max_8b, every, grids, seeds = SETTINGS[pname]
        lines += [f"### {pname}: target loss {target}, B = {base}, 8B = {8 * base}, "
                  f"seeds {seeds}", "",
                  "| optimizer | batch | best lr | median steps to target | per lr (median) |",
                  "|---|---|---|---|---|"]
        best: dict[tuple[str, int], float] = {}
        for batch, cap in ((base, max_b), (8 * base, max_8b)):
            for oname, grid in grids.items():
                per_lr = {}
                for lr in grid:
                    res = [steps_to_target(cls, oname, lr, batch, s, target, cap, every)
                           for s in seeds]
                    ok = [r if r is not None else math.inf for r in res]
                    per_lr[lr] = statistics.median(ok)
                    print(f"{pname} {oname} B={batch} lr={lr}: {res}", flush=True)
                lr_best = min(per_lr, key=per_lr.get)
                best[(oname, batch)] = per_lr[lr_best]
                fmt = ", ".join(f"{lr:g}: {'—' if math.isinf(v) else int(v)}"
                                for lr, v in per_lr.items())
                val = per_lr[lr_best]
                lines.append(f"| {oname} | {batch} | {lr_best:g} | "
                             f"{'not reached' if math.isinf(val) else int(val)} (cap {cap}) "
                             f"| {fmt} |")
        big = 8 * base
        base_best = min(best[("sgd_momentum", big)], best[("adam", big)])
        lines.append("")
        for form in ("neumann", "neumann_paper"):
            neu = best[(form, big)]
            if math.isinf(base_best) or math.isinf(neu):
                verdict = "ratio undefined (a method did not reach the target)"
            else:
                verdict = (f"{neu:g} / {base_best:g} = {neu / base_best:.2f} "
                           "(paper target: ≤ 0.80)")
            lines.append(f"- {form} / best baseline at 8B: {verdict}")
        lines.append("")
        for oname in grids:
            b1, b8 = best[(oname, base)], best[(oname, big)]
            if not (math.isinf(b1) or math.isinf(b8)):
                lines.append(f"- {oname}: steps(B) / steps(8B) = {b1 / b8:.2f}")
        lines.append("")
    header = [f"Machine: {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} torch thread(s); torch {torch.__version__}; "
              f"total wall time {time.time() - t_start:.0f} s", ""]
    text = "\n".join(header + lines)
    emit(text, args.out)


if __name__ == "__main__":
    main()
