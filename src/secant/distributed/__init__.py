"""Distributed plumbing on ``torch.distributed``: block partitioning and the few collectives the
optimizers need (gloo on CPU, NCCL on GPU; launch with ``torchrun``)."""

from secant.distributed.collectives import (
    all_gather_rows,
    all_reduce_flat,
    check_consistent,
    resolve_group,
)
from secant.distributed.partition import assign_blocks

__all__ = [
    "all_gather_rows",
    "all_reduce_flat",
    "assign_blocks",
    "check_consistent",
    "resolve_group",
]
