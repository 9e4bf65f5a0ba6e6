"""The multi-process harness itself: a hang fails within its timeout, and a process group that
outlives ``destroy_process_group()`` (the cause of the random SIGABRT at exit) fails every time."""

import time

import pytest
import torch
import torch.distributed as dist
from dist_harness import spawn

_PINNED = []


def _hang(rank, world):
    if rank == 1:
        time.sleep(600)


def _pin_the_group(rank, world):
    t = torch.ones(2)
    dist.all_reduce(t)
    _PINNED.append(dist.group.WORLD)  # a global reference, as a leaky library would keep


def test_a_hanging_rank_fails_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish in 5 s"):
        spawn(2, _hang, timeout=5)
    assert time.monotonic() - start < 60


def test_a_process_group_that_outlives_destroy_fails_the_run():
    with pytest.raises(Exception, match="outlived destroy_process_group"):
        spawn(2, _pin_the_group)
