"""``secant bench`` under ``torchrun``: one process per rank, the model wrapped in DDP and the
global batch split across ranks; rank 0 prints and writes the results.

``torchrun --standalone --nproc-per-node N -m secant bench ...`` sets ``WORLD_SIZE`` / ``RANK`` /
``LOCAL_RANK``; :func:`session` then joins the process group (gloo on CPU, NCCL with
``--device cuda``, one GPU per local rank). Without ``torchrun`` nothing changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from secant.bench.data import BenchError
from secant.distributed import all_gather_rows


@contextmanager
def session(device: str) -> Iterator[tuple[int, int]]:
    """Join the ``torchrun`` process group if launched by it, for the ``with`` block; yields
    ``(rank, world)``. A group joined here is destroyed at the end, so its threads do not run
    into interpreter exit."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world)`` of the running process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(model: nn.Module) -> nn.Module:
    """The model as trained: DDP-wrapped when running distributed."""
    return DistributedDataParallel(model) if world()[1] > 1 else model


def local_rows(idx: Tensor) -> Tensor:
    """This rank's equal share of a global batch of indices."""
    rank, size = world()
    if len(idx) % size:
        raise BenchError(f"--batch-size {len(idx)} is not divisible by the {size} ranks; "
                         "expected a multiple of the world size")
    share = len(idx) // size
    return idx[rank * share : (rank + 1) * share]


def agree(loss: float, elapsed: float) -> tuple[float, float]:
    """Mean minibatch loss and the slowest rank's training time, identical on every rank, so
    all ranks stop (budget, divergence) at the same step."""
    rank, size = world()
    if size == 1:
        return loss, elapsed
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([[loss, elapsed]], dtype=torch.float64, device=device)
    every = all_gather_rows(mine, 1, dist.group.WORLD)
    return float(every[:, 0].mean()), float(every[:, 1].max())
