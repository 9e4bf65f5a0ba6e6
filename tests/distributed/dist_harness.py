"""Start ``world`` gloo processes on this machine and run a worker function in each.

Every rank tears its process group down before it exits and checks that the group is really
gone: a group that something still holds keeps its gloo worker threads alive into interpreter
exit, where one that is still releasing a collective's buffer aborts the process at random
(SIGABRT, "terminate called without an active exception"). A pinned group therefore fails the
run every time, with a message, instead of now and then. A run that takes longer than
``timeout`` seconds is killed and fails, so a hang cannot block the suite.

FSDP2 is the exception: torch itself keeps a ``fully_shard`` mesh's process group alive (its
``DTensorSpec``s, referenced from outside Python's garbage collector, hold the ``DeviceMesh``),
so those tests pass ``pinned_by_torch=True`` and are checked for aborts by repetition instead
(``benchmarks/dist_stress.py``).
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import secant.distributed  # noqa: F401  (binds torch.distributed.nn before any group exists)

COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def _entry(rank, world, init_file, fn, args, pinned_by_torch):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, world, *args)
    finally:
        groups = [weakref.ref(g) for g in dist.distributed_c10d._world.pg_map]
        dist.destroy_process_group()
    gc.collect()
    alive = sum(g() is not None for g in groups)
    if alive and not pinned_by_torch:
        raise RuntimeError(f"rank {rank}: {alive} process group(s) outlived "
                           "destroy_process_group(); something still holds them, so their gloo "
                           "threads would run into interpreter exit")


def spawn(world: int, fn, *args, timeout: float = 240.0, pinned_by_torch: bool = False) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; raises if any rank fails, or
    ``TimeoutError`` (after killing the ranks) if they have not all finished in ``timeout``
    seconds. ``pinned_by_torch``: do not fail on a group that outlives its destruction (FSDP2,
    module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(_entry, args=(world, init_file, fn, args, pinned_by_torch),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                    p.join()
                raise TimeoutError(f"{world} ranks running {fn.__name__} did not finish "
                                   f"in {timeout:.0f} s")
