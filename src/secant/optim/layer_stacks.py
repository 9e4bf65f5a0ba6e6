"""Layer stacks: the per-layer state of layers updated together, kept in padded stacked tensors
so that one batched op updates all of them (the unit of a K-BFGS step; docs/kronecker.md,
"Step cost").

A stack of ``L`` layers holds each state tensor name in one tensor ``[L, *S]``, ``S`` the
largest of the layers' shapes: layer ``j``'s tensor is the leading corner
``stack[j, :n₀, :n₁, ...]`` and the rest is padding, zero, or the identity for the square
matrices named in ``eye`` (an inverse-curvature matrix padded by ``I`` stays block diagonal
under BFGS updates whose vectors are zero in the padding, so padding never mixes with a
layer's block and the layer's block gets the same arithmetic as it would alone, with exact
zeros added). The optimizer's per-layer dicts hold these corners as views, so per-layer code
(checkpoints, diagnostics, warm starts, first steps) reads and writes the stacks in place.

Which layers share a stack (:func:`plan`): layers of the same kind (same state names, same
hyperparameter group) are sorted by size and grouped greedily while the padding adds at most
``PAD_RATIO − 1`` of their own state, or at most ``PAD_FREE`` entries (on small layers a step
costs per dispatched op, not per entry: one batched op over a padded stack is cheaper than one
op per layer; on large ones padded entries cost more than the ops they save). Equal shapes
always share a stack.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

PAD_RATIO = 1.2
PAD_FREE = 1 << 18


def _padded_size(shapes: list[dict[str, tuple[int, ...]]]) -> int:
    """Entries of the stack holding layers with these per-name shapes."""
    return len(shapes) * sum(math.prod(max(dims) for dims in zip(*(s[k] for s in shapes)))
                             for k in shapes[0])


def plan(shapes: Sequence[dict[str, tuple[int, ...]]], kinds: Sequence[Hashable]
         ) -> list[list[int]]:
    """Layer indices per stack: layers of one kind sorted by their state's size, cut greedily
    (see the module docstring); every index in exactly one stack."""
    stacks: list[list[int]] = []
    by_kind: dict[Hashable, list[int]] = {}
    for i, kind in enumerate(kinds):
        by_kind.setdefault(kind, []).append(i)
    for members in by_kind.values():
        members.sort(key=lambda i: sum(math.prod(s) for s in shapes[i].values()))
        current: list[int] = []
        for i in members:
            trial = [shapes[j] for j in current + [i]]
            own = sum(math.prod(s) for t in trial for s in t.values())
            padded = _padded_size(trial)
            if current and padded - own > max((PAD_RATIO - 1) * own, PAD_FREE):
                stacks.append(current)
                current = []
            current.append(i)
        if current:
            stacks.append(current)
    return stacks


class LayerStack:
    """The stacked state of the layers ``index`` (see the module docstring).

    Built from the layers' dicts of tensors (all with the same names), whose values it replaces
    by views of its stacks. ``tensors[name]`` is the stack ``[L, *S]``.
    """

    def __init__(self, index: list[int], layer_states: list[dict[str, Tensor]],
                 eye: frozenset[str] = frozenset()) -> None:
        self.index = index
        self.tensors: dict[str, Tensor] = {}
        for key, first in layer_states[0].items():
            own = [ls[key] for ls in layer_states]
            shape = [max(dims) for dims in zip(*(t.shape for t in own))]
            stack = first.new_zeros(len(own), *shape)
            if key in eye:
                stack.copy_(torch.eye(shape[-1], dtype=stack.dtype, device=stack.device))
            views = self.corners(stack, [t.shape for t in own])
            torch._foreach_copy_(views, own)
            for ls, v in zip(layer_states, views):
                ls[key] = v
            self.tensors[key] = stack
        self._packed: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}  # (pack)
        #: views of the stacks an optimizer derives once (e.g. a matrix's blocks), valid as
        #: long as the stacks are
        self.derived: dict[str, Any] = {}

    @staticmethod
    def corners(stack: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
        """The views ``stack[j, :n₀, :n₁, ...]`` for the layers' shapes."""
        return [stack[(j, *(slice(0, n) for n in s))] for j, s in enumerate(shapes)]

    def __len__(self) -> int:
        return len(self.index)

    def pack(self, per_layer: Sequence[Sequence[Tensor]], shapes: Sequence[Sequence[int]]
             ) -> list[Tensor]:
        """Per-layer tensors (``per_layer[j]``: layer ``j``'s tensors, in the order of
        ``shapes``) as zero-padded stacks ``[L, *shapes[k]]``: one ``foreach`` copy into the
        layers' corners of stacks kept with this object, one set per layer shapes, dtype and
        device, whose padding is never written (a stack of one layer: views of its tensors, no
        copy). The result is valid until the next ``pack`` of the same shapes (the next step):
        on the digits autoencoder 10 µs against 47 for a concatenation and an indexed copy
        into a new buffer. The price: these buffers stay allocated between steps (scratch, not
        state: not in ``state_dict``), for K-BFGS one more padded ``A``-sized tensor per stack
        of several layers."""
        if len(per_layer) == 1 and all(t.shape == tuple(s) for t, s in zip(per_layer[0], shapes)):
            return [t.unsqueeze(0) for t in per_layer[0]]  # one layer, nothing to pad
        first = per_layer[0][0]
        key = (tuple(tuple(t.shape) for ts in per_layer for t in ts), tuple(map(tuple, shapes)),
               first.dtype, first.device)
        if key not in self._packed:
            stacks = [first.new_zeros(len(per_layer), *s) for s in shapes]
            corners = [c for k, stack in enumerate(stacks)
                       for c in self.corners(stack, [ts[k].shape for ts in per_layer])]
            self._packed[key] = (stacks, corners)
        stacks, corners = self._packed[key]
        torch._foreach_copy_(corners, [ts[k] for k in range(len(shapes)) for ts in per_layer])
        return list(stacks)
