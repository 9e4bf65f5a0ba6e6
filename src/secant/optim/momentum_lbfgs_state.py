""":class:`~secant.optim.MomentumLBFGS`'s state in the ``torch.optim`` checkpoint format, every
entry keyed by a parameter: what ``torch.distributed.checkpoint`` (DCP) needs to map the state
to parameter names, and to reshard it.

The optimizer keeps its state in flat chunked buffers (:class:`~secant.optim.block_layout.
BlockLayout`). Its ``state_dict()`` holds, per parameter ``p``:

* ``momentum_buffer``: ``p``'s entries of the heavy-ball buffer, shaped like ``p``;
* where this rank keeps ``p``'s block: ``param_ema``, ``grad_ema``, ``param_snapshot``,
  ``grad_snapshot`` shaped like ``p``, and ``history`` of shape ``[2m, *p.shape]`` (the ``s``
  vectors of the ring's slots, then the ``y`` vectors);
* the first parameter of each such block: the block's own values under ``mlbfgs_*`` keys (its
  Gram matrix, ring head and count, counters and flags);
* the first parameter of all: ``mlbfgs_step``, ``mlbfgs_skipped_steps``, ``mlbfgs_last_lrs``.

Under FSDP2 the tensors shaped like a parameter are ``DTensor``s sharded like it (the history on
its dim 1) and the per-block values are plain tensors, equal on every rank: DCP saves each shard
once and loads a checkpoint on another number of ranks. Under DDP each block's state is in the
entries of the rank that keeps it. Chunk padding is zero by construction and is not stored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from secant.distributed import local, sharded_like

PREFIX = "mlbfgs_"
OWN_VECTORS = ("param_ema", "grad_ema", "param_snapshot", "grad_snapshot")
PER_BLOCK = ("gram", "head", "count", "pairs_accepted", "pairs_rejected",
             "damping_activations", "ema_started", "has_snapshot")
GLOBAL = ("step", "skipped_steps", "last_lrs")


def _history_slots(opt: Any, history: Tensor) -> list[list[Tensor]]:
    """Per ring slot (``2m``), views of the own parameters' entries in a contiguous copy."""
    lay = opt._layout
    return [lay.views(history[:, j].contiguous(), opt._own_params, opt._own.start)
            for j in range(history.shape[1])]


def _first_param(opt: Any) -> Tensor:
    """The parameter whose entry holds the optimizer-wide values."""
    return next(p for g in opt.param_groups for p in g["params"])


def _block_heads(opt: Any) -> list[tuple[int, Tensor]]:
    """``(local block index, first parameter)`` of each block this rank keeps."""
    return [(j, opt._blocks[b][0]) for j, b in enumerate(opt._layout.shards[opt._rank])]


def param_entries(opt: Any, st: dict[str, Any]) -> dict[Tensor, dict[str, Any]]:
    """The per-parameter entries (see the module docstring) of the flat state ``st``."""
    lay = opt._layout
    entries: dict[Tensor, dict[str, Any]] = {
        p: {"momentum_buffer": sharded_like(p, v)}
        for p, v in zip(lay.params, lay.views(st["momentum_buffer"]))}
    own = opt._own_params
    if own:
        vectors = {k: lay.views(st[k], own, opt._own.start) for k in OWN_VECTORS}
        slots = _history_slots(opt, st["history"])
        m2 = len(slots)
        for i, p in enumerate(own):
            entries[p].update({k: sharded_like(p, v[i]) for k, v in vectors.items()})
            entries[p]["history"] = sharded_like(
                p, torch.stack([slot[i] for slot in slots]), (m2,))
    for j, p in _block_heads(opt):
        entries[p].update({PREFIX + k: st[k][j] for k in PER_BLOCK})
    first = _first_param(opt)
    entries.setdefault(first, {}).update({PREFIX + k: st[k] for k in GLOBAL})
    return entries


def check_entries(opt: Any, entries: dict[Tensor, dict[str, Any]],
                  fresh: dict[str, Any]) -> None:
    """``ValueError`` unless ``entries`` hold everything this rank's state needs, in its
    shapes (``fresh``: a new state of this optimizer)."""
    def need(p: Tensor, key: str, numel: int | None, why: str) -> None:
        v = entries.get(p, {}).get(key)
        if v is None:
            raise ValueError(f"state_dict was not saved by a MomentumLBFGS optimizer over these "
                             f"parameters: no {key!r} {why} (saved on another rank, or by "
                             "another optimizer?)")
        if numel is not None and local(v).numel() != numel:
            raise ValueError(f"state_dict entry {key!r} has {local(v).numel()} elements on this "
                             f"rank, expected {numel} (different model, blocks, sharding or "
                             "history_size?)")

    m2 = fresh["history"].shape[1]
    first = _first_param(opt)
    for k in GLOBAL:
        need(first, PREFIX + k, None, "for the first parameter")
    numel = {p: shape.numel() for p, shape in zip(opt._layout.params, opt._layout.shapes)}
    for p, n in numel.items():
        need(p, "momentum_buffer", n, "for a parameter")
    for p in opt._own_params:
        n = numel[p]
        for k in OWN_VECTORS:
            need(p, k, n, "for a parameter whose block this rank keeps")
        need(p, "history", m2 * n, "for a parameter whose block this rank keeps")
    for j, p in _block_heads(opt):
        for k in PER_BLOCK:
            need(p, PREFIX + k, fresh[k][j].numel(), "for a block this rank keeps")


@torch.no_grad()
def load_entries(opt: Any, entries: dict[Tensor, dict[str, Any]], st: dict[str, Any]) -> None:
    """Copy checked ``entries`` into the flat state ``st`` (a fresh state of ``opt``)."""
    lay = opt._layout

    def fill(views: list[Tensor], params: list[Tensor], key: str) -> None:
        for v, p in zip(views, params):
            v.copy_(local(entries[p][key]).reshape(v.shape))

    fill(lay.views(st["momentum_buffer"]), lay.params, "momentum_buffer")
    own = opt._own_params
    if own:
        for k in OWN_VECTORS:
            fill(lay.views(st[k], own, opt._own.start), own, k)
        for j in range(st["history"].shape[1]):
            slot = torch.zeros_like(st["history"][:, j])
            for v, p in zip(lay.views(slot, own, opt._own.start), own):
                v.copy_(local(entries[p]["history"])[j].reshape(v.shape))
            st["history"][:, j] = slot
    for j, p in _block_heads(opt):
        for k in PER_BLOCK:
            st[k][j] = local(entries[p][PREFIX + k])
    first = _first_param(opt)
    step, skipped, last_lrs = (entries[first][PREFIX + k] for k in GLOBAL)
    st["step"] = int(step)
    st["skipped_steps"].copy_(local(skipped))
    st["last_lrs"] = list(last_lrs)
