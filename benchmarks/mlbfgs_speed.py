"""Iteration time of MomentumLBFGS vs SGD with momentum, and memory bandwidth of the history apply.

Workload: the MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (2,837,314 parameters),
batch 1000 of synthetic inputs in [0, 1], pixel-summed sigmoid BCE. A full training iteration
is ``zero_grad`` + forward + backward + ``step``. The MomentumLBFGS history (m = 10) is filled
first (pairs every 2 steps), then the update period is set to 50 as in the paper's runs, so
the timed steps are steady-state quasi-Newton steps. SGD and mL-BFGS iterations alternate in
the same loop so that machine noise hits both alike; medians are reported.

Bandwidth: the history apply (:func:`secant.linalg.compact_apply`) must read the whole history
twice (projection, reconstruction) plus the vector, and write the result; achieved bandwidth =
those bytes / median time, compared with ``copy_`` of a tensor as large as the history
(read + write) timed in the same run.

Run: python benchmarks/mlbfgs_speed.py > benchmarks/mlbfgs_speed.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from secant import MomentumLBFGS
from secant.bench.models import MNIST_WIDTHS, autoencoder
from secant.bench.runner import state_bytes
from secant.linalg import compact_apply, newest_gamma


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, MNIST_WIDTHS[0])
    models = {"sgd": autoencoder(MNIST_WIDTHS), "mlbfgs": autoencoder(MNIST_WIDTHS)}
    models["mlbfgs"].load_state_dict(models["sgd"].state_dict())
    opts = {
        "sgd": torch.optim.SGD(models["sgd"].parameters(), lr=1e-4, momentum=0.9),
        "mlbfgs": MomentumLBFGS(models["mlbfgs"].parameters(), lr=1e-4, momentum=0.9,
                                history_size=10, update_period=2, blocks="tensor"),
    }

    def iteration(name: str) -> None:
        opt, model = opts[name], models[name]
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x), x, reduction="sum").div(
            args.batch).backward()
        opt.step()

    for _ in range(2 * 12):  # fill the m = 10 history
        iteration("mlbfgs")
    mlbfgs = opts["mlbfgs"]
    assert mlbfgs.diagnostics()["history_length"] == [10] * 16
    mlbfgs.update_period = 50
    times: dict[str, list[float]] = {"sgd": [], "mlbfgs": []}
    for _ in range(args.iters):
        for name in times:
            t0 = time.perf_counter()
            iteration(name)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    h = mlbfgs._history()
    d = torch.randn(h.z.shape[0], 1, h.z.shape[2])
    gamma = newest_gamma(h)
    t_apply = median_time(lambda: compact_apply(h, d, gamma), 20)
    big_src, big_dst = torch.randn_like(h.z), torch.empty_like(h.z)
    t_copy = median_time(lambda: big_dst.copy_(big_src), 20)
    hist_bytes = h.z.numel() * h.z.element_size()
    vec_bytes = d.numel() * d.element_size()
    bw_apply = (2 * hist_bytes + 2 * vec_bytes) / t_apply
    bw_copy = 2 * hist_bytes / t_copy

    n_params = sum(p.numel() for p in models["sgd"].parameters())
    print("# MomentumLBFGS speed and history bandwidth (CPU)\n")
    print(f"- machine: {platform.machine()} CPU, {torch.get_num_threads()} threads "
          f"(shared 2-core development machine, noisy); torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    print(f"- command: `python benchmarks/mlbfgs_speed.py --iters {args.iters} "
          f"--batch {args.batch} --threads {args.threads}`")
    print(f"- model: MNIST autoencoder, {n_params:,} parameters, batch {args.batch}, "
          f"{args.iters} alternating iterations each\n")
    print("| optimizer | median iteration (ms) | ratio to SGD | optimizer state (MB) |")
    print("|---|---|---|---|")
    for name, label in (("sgd", "SGD momentum 0.9"), ("mlbfgs", "MomentumLBFGS m=10")):
        print(f"| {label} | {1e3 * med[name]:.1f} | {med[name] / med['sgd']:.3f} | "
              f"{state_bytes(opts[name]) / 2**20:.1f} |")
    print(f"\nTarget: ratio <= 1.35. Measured: {med['mlbfgs'] / med['sgd']:.3f}.\n")
    print("| history apply | value |")
    print("|---|---|")
    print(f"| history size | {hist_bytes / 2**20:.1f} MB ([K, 2m, c] = {tuple(h.z.shape)}) |")
    print(f"| compact_apply median | {1e3 * t_apply:.2f} ms |")
    print(f"| achieved bandwidth (2 history reads + vector in/out) | {bw_apply / 1e9:.2f} GB/s |")
    print(f"| copy_ of a history-sized tensor (read + write) | {bw_copy / 1e9:.2f} GB/s |")
    print(f"| ratio | {bw_apply / bw_copy:.2f} |")
    print(f"\nTarget: ratio >= 0.50. Measured: {bw_apply / bw_copy:.2f}.")


if __name__ == "__main__":
    main()
