"""Assigning curvature blocks to ranks."""

from __future__ import annotations

from collections.abc import Sequence


def assign_blocks(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Balance blocks over ``world`` ranks by size (greedy: largest block to the least-loaded
    rank, ties to the lower rank). Returns the block indices of each rank in ascending order.

    Deterministic, so every rank computes the same assignment without communication. Ranks may
    own no block when there are fewer blocks than ranks.
    """
    if world < 1:
        raise ValueError(f"world={world} must be >= 1")
    load = [0] * world
    shards: list[list[int]] = [[] for _ in range(world)]
    for b in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda k: (load[k], k))
        shards[r].append(b)
        load[r] += sizes[b]
    return [sorted(s) for s in shards]
