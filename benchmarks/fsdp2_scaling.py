"""Optimizer state per rank and communication per optimizer step under FSDP2 and DDP (gloo,
CPU), 1, 2 and 4 ranks, for every secant optimizer and AdamW as the reference.

Each rank trains the CURVES autoencoder (842,340 parameters, float32) on its own batch for
``--warmup`` steps (MomentumLBFGS: a pair every 5 steps, so its history is in use), then
``--steps`` more with every collective of ``opt.step()`` recorded by a dispatch mode: the
number of collectives and their payload (an all-reduce's buffer, an all-gather's output, in
bytes), averaged per step. Not counted: the collectives inside the closure, i.e. the model's
own forward and backward (DDP's gradient all-reduce, FSDP2's all-gathers and reduce-scatter),
which are the same for every optimizer except that K-BFGS runs a second pass. State: bytes of
the tensors in ``opt.state_dict()`` held by the rank (a DTensor's
local shard), largest over the ranks.

Run: python benchmarks/fsdp2_scaling.py > benchmarks/fsdp2_scaling.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import secant
from secant.bench.models import CURVES_WIDTHS, autoencoder
from secant.bench.runner import state_bytes

OPTIMIZERS = {  # over the (wrapped) model
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "neumann": lambda m: secant.Neumann(m.parameters(), lr=0.01),
    "mlbfgs": lambda m: secant.MomentumLBFGS(m.parameters(), lr=0.01, update_period=5),
    "mlbfgs-tensor": lambda m: secant.MomentumLBFGS(m.parameters(), lr=0.01, update_period=5,
                                                    blocks="tensor"),
    "kfac": lambda m: secant.KFAC(m, lr=0.01, damping=0.03),
    "kfac-communication": lambda m: secant.KFAC(m, lr=0.01, damping=0.03,
                                                distributed_mode="communication"),
    "kbfgs": lambda m: secant.KBFGS(m, lr=0.1, damping=0.3),
}


# eager c10d ops, and the functional collectives DTensor uses (``full_tensor``); not the waits
COLLECTIVES = ("c10d", "_c10d_functional")
WAITS = ("wait_tensor",)


class Collectives(TorchDispatchMode):
    """Counts the c10d collectives run inside it and sums their payloads."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.bytes = 0
        self.paused = False  # inside the closure

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in COLLECTIVES and func.__name__.split(".")[0] not in WAITS \
                and not self.paused:
            tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, Tensor)]
            self.count += 1
            self.bytes += max((t.numel() * t.element_size() for t in tensors), default=0)
        return func(*args, **(kwargs or {}))


def worker(rank, world, init_file, name, mode, steps, warmup, batch, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    torch.manual_seed(0)
    model = autoencoder(CURVES_WIDTHS)
    if mode == "fsdp2":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        model = fully_shard(model, mesh=mesh)
    else:
        model = DDP(model)
    opt = OPTIMIZERS[name](model)
    x = torch.rand(batch, CURVES_WIDTHS[0], generator=torch.Generator().manual_seed(rank))
    comm = Collectives()

    def closure():
        comm.paused = True
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), x)
        loss.backward()
        comm.paused = False
        return loss

    for t in range(warmup + steps):
        if t < warmup:
            opt.step(closure)
        else:
            with comm:
                opt.step(closure)
    mine = torch.tensor([state_bytes(opt)], dtype=torch.long)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        torch.save({"state": max(int(m) for m in every), "count": comm.count / steps,
                    "bytes": comm.bytes / steps}, os.path.join(out_dir, "result.pt"))
    opt = model = closure = None  # freed before the group is destroyed
    gc.collect()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--per-rank-batch", type=int, default=50)
    args = ap.parse_args()
    print("# Optimizer state and communication per step: FSDP2 vs DDP (gloo, CPU)\n")
    print(f"- machine: {platform.machine()} CPU with {os.cpu_count()} cores; torch "
          f"{torch.__version__}, Python {platform.python_version()}")
    print(f"- command: `python benchmarks/fsdp2_scaling.py --worlds {args.worlds} --steps "
          f"{args.steps} --warmup {args.warmup} --per-rank-batch {args.per_rank_batch}`")
    print("- model: CURVES autoencoder (842,340 float32 parameters = 3.37 MB); FSDP2 shards "
          "every Linear and the root on a 1-D mesh; DDP replicates; MomentumLBFGS with "
          "update_period=5, history 10; K-FAC factors every 10 steps, inverses every 100 (so "
          "none in the counted steps); K-BFGS default settings\n")
    print("| optimizer | mode | ranks | state per rank, max (MB) | vs 1 rank | collectives "
          "per step | payload per step (kB) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.optimizers.split(","):
        for mode in ("ddp", "fsdp2"):
            base = None
            for world in (int(w) for w in args.worlds.split(",")):
                with tempfile.TemporaryDirectory() as tmp:
                    mp.start_processes(worker, nprocs=world, start_method="spawn", join=True,
                                       args=(world, os.path.join(tmp, "init"), name, mode,
                                             args.steps, args.warmup, args.per_rank_batch, tmp))
                    res = torch.load(os.path.join(tmp, "result.pt"))
                mb = res["state"] / 1e6
                base = base or mb
                print(f"| {name} | {mode} | {world} | {mb:.2f} | {mb / base:.2f}x | "
                      f"{res['count']:.1f} | {res['bytes'] / 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
