"""Weak scaling of the secant optimizers under DDP with gloo on CPU: 1, 2 and 4 ranks.

Each rank trains the CURVES autoencoder (784-400-200-100-50-25-6-…-784, 842,340 parameters) on
its own batch of ``--per-rank-batch`` synthetic images (global batch grows with the world), for
``--steps`` steps after a warm-up that fills the curvature state; reported per world size: the
median wall time of a full step (forward, backward with DDP's all-reduce, optimizer step) on
rank 0, and the curvature memory each rank holds (largest over ranks).

Run: python benchmarks/distributed_scaling.py > benchmarks/distributed_scaling.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import secant
from secant.bench.models import CURVES_WIDTHS, autoencoder
from secant.bench.runner import state_bytes

CLASSES = {"mlbfgs": "MomentumLBFGS", "neumann": "Neumann", "kfac": "KFAC", "kbfgs": "KBFGS",
           "kbfgsl": "KBFGSL"}


def make_optimizer(name: str, model: nn.Module):
    cls = getattr(secant, CLASSES[name])
    if name == "mlbfgs":
        # one block per tensor, so there are blocks to spread over the ranks (the default,
        # one block per parameter group, is a single block here and is not spread)
        return cls(model.parameters(), lr=0.01, update_period=5, blocks="tensor")
    if name == "neumann":
        return cls(model.parameters(), lr=0.01)
    return cls(model, lr=0.01)


def worker(rank, world, init_file, name, steps, warmup, batch, out_dir, device_type):
    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    torch.manual_seed(0)
    model = DDP(autoencoder(CURVES_WIDTHS).to(device))
    opt = make_optimizer(name, model)
    gen = torch.Generator().manual_seed(rank)
    x = torch.rand(batch, CURVES_WIDTHS[0], generator=gen).to(device)

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), x, reduction="sum")
        (loss / batch).backward()
        return loss

    times = []
    for t in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        opt.step(closure)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if t >= warmup:
            times.append(time.perf_counter() - t0)
    mem = torch.tensor([state_bytes(opt)], dtype=torch.long, device=device)
    every = [torch.zeros_like(mem) for _ in range(world)]
    dist.all_gather(every, mem)
    if rank == 0:
        torch.save({"median": statistics.median(times), "mem": [int(m) for m in every]},
                   os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizers", default="mlbfgs,neumann,kfac,kbfgs,kbfgsl")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--per-rank-batch", type=int, default=250)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: gloo; cuda: NCCL, one GPU per rank")
    args = ap.parse_args()
    names = [n for n in args.optimizers.split(",") if hasattr(secant, CLASSES[n])]
    worlds = [int(w) for w in args.worlds.split(",")]
    print(f"# Distributed weak scaling ({'NCCL, GPU' if args.device == 'cuda' else 'gloo, CPU'})\n")
    print(f"- machine: {platform.machine()} CPU with {os.cpu_count()} cores (shared, noisy); "
          f"torch {torch.__version__}, Python {platform.python_version()}; 1 thread per rank")
    print(f"- command: `python benchmarks/distributed_scaling.py --worlds {args.worlds} "
          f"--steps {args.steps} --warmup {args.warmup} --per-rank-batch "
          f"{args.per_rank_batch} --device {args.device}`")
    print("- model: CURVES autoencoder (842,340 parameters), per-rank batch "
          f"{args.per_rank_batch}; step = forward + backward (DDP all-reduce) + optimizer step")
    print("- with more ranks than cores the ranks time-share the CPU: step times at 4 ranks "
          "measure oversubscription as much as communication\n")
    print("| optimizer | ranks | median step (ms) | optimizer state per rank, max (MB) | "
          "vs 1 rank |")
    print("|---|---|---|---|---|")
    for name in names:
        base = None
        for world in worlds:
            with tempfile.TemporaryDirectory() as tmp:
                mp.start_processes(worker, nprocs=world, start_method="spawn", join=True,
                                   args=(world, os.path.join(tmp, "init"), name, args.steps,
                                         args.warmup, args.per_rank_batch, tmp, args.device))
                res = torch.load(os.path.join(tmp, "result.pt"))
            mem = max(res["mem"]) / 2**20
            base = base or mem
            print(f"| {name} | {world} | {1e3 * res['median']:.1f} | {mem:.2f} | "
                  f"{mem / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
