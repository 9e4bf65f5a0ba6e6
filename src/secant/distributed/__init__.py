"""Distributed plumbing on ``torch.distributed``: block partitioning, the FSDP2 layout check and
the few collectives the optimizers need (gloo on CPU, NCCL on GPU; launch with ``torchrun``)."""

from secant.distributed.collectives import (
    all_gather_rows,
    all_reduce_flat,
    check_consistent,
    resolve_group,
)
from secant.distributed.partition import assign_blocks
from secant.distributed.sharding import full, local, local_rows, shard_group, sharded_like

__all__ = [
    "all_gather_rows",
    "all_reduce_flat",
    "assign_blocks",
    "check_consistent",
    "full",
    "local",
    "local_rows",
    "resolve_group",
    "shard_group",
    "sharded_like",
]
