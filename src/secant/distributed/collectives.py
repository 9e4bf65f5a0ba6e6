"""Process-group resolution, set-up consistency checks, the direction all-gather and the flat
all-reduce of a list of tensors."""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Sequence
from functools import reduce

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    # Imported here, before any process group exists, on purpose. This module's functions bind
    # ``group.WORLD`` as default arguments when first imported; torch imports it lazily (with
    # torch._dynamo, e.g. at the first optimizer or DDP construction), which after
    # ``init_process_group`` pins the default group for the life of the process.
    # ``destroy_process_group()`` then cannot free it, its gloo worker threads outlive the
    # script, and one still releasing the last collective's buffer (a tensor with a Python
    # object, as every buffer here is) aborts the process during interpreter exit (SIGABRT,
    # "terminate called without an active exception").
    import torch.distributed.nn.functional  # noqa: F401

# Python references to the buffers of the latest collectives. A gloo worker thread lets go of a
# finished collective's buffers some time after wait() has returned; were it the last holder of
# a tensor that has a Python object (every buffer here has one), it would need the GIL to free
# it: a deadlock if the main thread is then destroying the process group (which joins that
# worker while holding the GIL), an abort (SIGABRT) if the interpreter is exiting. Kept here
# until later collectives push them out, they are freed by the main thread instead. Four covers
# gloo's two worker threads with room to spare; the cost is at most four buffers of memory.
_RECENT: deque[tuple[Tensor, ...]] = deque(maxlen=4)

# torch >= 2.10 names it all_gather_single; older releases all_gather_into_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def resolve_group(process_group: dist.ProcessGroup | None) -> tuple[
        dist.ProcessGroup | None, int, int]:
    """``(group, rank, world)``; ``(None, 0, 1)`` when not running distributed.

    With ``process_group=None`` the default group is used if ``torch.distributed`` is
    initialised with more than one rank.
    """
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None, 0, 1
        process_group = dist.group.WORLD
    return process_group, dist.get_rank(process_group), dist.get_world_size(process_group)


def check_consistent(description: str, group: dist.ProcessGroup, device: torch.device,
                     what: str) -> None:
    """Raise ``ValueError`` on every rank if the ranks' ``description`` strings differ.

    One small all-gather of a checksum; it runs under the process group's timeout, so a rank
    that never arrives fails the others instead of hanging forever.
    """
    mine = torch.tensor([zlib.crc32(description.encode())], dtype=torch.long, device=device)
    world = dist.get_world_size(group)
    every = torch.empty(world, dtype=torch.long, device=device)
    _all_gather(every, mine, group=group)
    _RECENT.append((every, mine))
    if not bool((every == every[0]).all()):
        ranks = [r for r in range(world) if every[r] != every[0]]
        raise ValueError(f"ranks disagree on {what}: rank(s) {ranks} differ from rank 0 "
                         f"(this rank: {description[:200]})")


def all_gather_rows(own: Tensor, rows_per_rank: int, group: dist.ProcessGroup,
                    out: Tensor | None = None) -> Tensor:
    """Concatenate every rank's ``own [k_r, c]`` (zero-padded to ``rows_per_rank``) into
    ``[world · rows_per_rank, c]``, identical on every rank (written into the contiguous
    ``out`` when given)."""
    padded = own.new_zeros(rows_per_rank, own.shape[1])
    padded[: own.shape[0]] = own
    if out is None:
        out = own.new_empty(dist.get_world_size(group) * rows_per_rank, own.shape[1])
    _all_gather(out, padded, group=group)
    _RECENT.append((out, padded))
    return out


def all_reduce_flat(tensors: Sequence[Tensor], group: dist.ProcessGroup,
                    average: bool = False) -> list[Tensor]:
    """Sum (``average=True``: mean) each tensor of ``tensors`` over the ranks with **one**
    all-reduce of one flat buffer; returns new tensors with the inputs' shapes and dtypes.

    The buffer has the promoted dtype of the inputs. Every rank must pass the same shapes in the
    same order (an empty list is no collective at all).
    """
    if not tensors:
        return []
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, group=group)
    _RECENT.append((flat,))
    if average:
        flat.div_(dist.get_world_size(group))
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset: offset + n].view(t.shape).to(t.dtype))
        offset += n
    return out
