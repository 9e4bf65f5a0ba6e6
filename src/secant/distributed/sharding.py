"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): ``DTensor``s split
on dim 0 over one mesh dimension (HSDP: replicated over the other). The layout check every
rank runs at construction on local metadata only (no collective, so a refusal can never turn
into a hang), and the local views the optimizers compute on."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard


def local(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (a view: in-place updates reach the parameter), or
    ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Tensor) -> Tensor:
    """The whole of a ``DTensor`` (an all-gather over its shards: a collective that every rank
    of its mesh must call, in the same order), or ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_rows(p: Tensor, whole: Tensor) -> Tensor:
    """The rows of ``whole`` (shaped as ``p``'s global tensor) that ``p``'s local shard holds:
    FSDP2 splits dim 0 with ``torch.chunk`` over the shard mesh dimension (fewer chunks than
    ranks leave the last ranks empty); ``whole`` itself for a plain tensor."""
    if not isinstance(p, DTensor):
        return whole
    (dim,) = [i for i, pl in enumerate(p.placements) if pl == Shard(0)]
    n, coord = p.device_mesh.size(dim), p.device_mesh.get_local_rank(dim)
    chunks = torch.chunk(whole, n, dim=0)
    return chunks[coord] if coord < len(chunks) else whole[:0]


def sharded_like(p: Tensor, t: Tensor, lead: tuple[int, ...] = ()) -> Tensor:
    """``t`` (this rank's part of a tensor of shape ``[*lead, *p.shape]``) as a ``DTensor``
    sharded like ``p`` on its trailing dims; ``t`` itself when ``p`` is a plain tensor."""
    if not isinstance(p, DTensor):
        return t
    k = len(lead)
    placements = [Shard(pl.dim + k) if isinstance(pl, Shard) else pl for pl in p.placements]
    shape = (*lead, *p.shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, p.device_mesh, placements, run_check=False, shape=shape,
                              stride=stride)


def shard_group(params: Iterable[Tensor], optimizer: str) -> dist.ProcessGroup | None:
    """The process group over which the ``DTensor`` parameters are sharded (``None`` if none
    is a ``DTensor``). Accepted: one mesh for all of them, ``Shard(0)`` on one mesh dimension
    (FSDP2) and ``Replicate()`` on any other (HSDP). Anything else raises ``ValueError`` naming
    the parameter's placements."""
    mesh, shard_dim = None, None
    for p in params:
        if not isinstance(p, DTensor):
            continue
        placements = tuple(p.placements)
        dims = [i for i, pl in enumerate(placements) if pl == Shard(0)]
        if len(dims) != 1 or any(not isinstance(pl, Replicate)
                                 for i, pl in enumerate(placements) if i != dims[0]):
            raise ValueError(
                f"{optimizer} supports DTensor parameters sharded on dim 0 over one mesh "
                f"dimension (FSDP2, or HSDP with Replicate() elsewhere); got placements "
                f"{placements} for a parameter of shape {tuple(p.shape)} (tensor parallel "
                "is not supported)")
        if mesh is None:
            mesh, shard_dim = p.device_mesh, dims[0]
        elif p.device_mesh != mesh or dims[0] != shard_dim:
            raise ValueError(f"{optimizer} needs every DTensor parameter on one device mesh "
                             f"with the same placements; got {mesh} and {p.device_mesh}")
    return None if mesh is None else mesh.get_group(shard_dim)
