"""A short demo run: MomentumLBFGS against SGD and Adam on a noisy ill-conditioned problem."""

from __future__ import annotations

import time

import torch

from secant import MomentumLBFGS


def _problem(seed: int = 0, n: int = 50, samples: int = 4096):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 0, n)
    x = torch.randn(samples, n, generator=gen) * scales
    w_true = torch.randn(n, generator=gen)
    y = x @ w_true + 0.1 * torch.randn(samples, generator=gen)
    return x, y


def run_demo(steps: int = 600, batch: int = 64) -> list[tuple[str, float, float]]:
    """Train a linear least-squares model with each optimizer; return (name, loss, seconds)."""
    x, y = _problem()
    makers = {
        "SGD(momentum=0.9)": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9),
        "Adam": lambda p: torch.optim.Adam(p, lr=0.03),
        "MomentumLBFGS": lambda p: MomentumLBFGS(p, lr=0.3, beta=0.9, update_period=20),
    }
    rows = []
    for name, make in makers.items():
        torch.manual_seed(0)
        w = torch.zeros(x.shape[1], requires_grad=True)
        opt = make([w])
        gen = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            opt.zero_grad()
            loss = 0.5 * ((x[idx] @ w - y[idx]) ** 2).mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            full = 0.5 * ((x @ w - y) ** 2).mean().item()
        rows.append((name, full, time.perf_counter() - start))
    return rows


def main() -> None:
    print(f"{'optimizer':<20} {'final loss':>12} {'seconds':>8}")
    for name, loss, sec in run_demo():
        print(f"{name:<20} {loss:>12.5f} {sec:>8.2f}")
