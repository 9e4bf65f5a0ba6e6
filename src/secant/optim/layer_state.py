"""The layer optimizers' state (:class:`~secant.KFAC`, :class:`~secant.KBFGS`,
:class:`~secant.KBFGSL`) in the ``torch.optim`` checkpoint format, every entry keyed by a
parameter: what ``torch.distributed.checkpoint`` (DCP) needs to map the state to parameter names,
and to reshard it.

The optimizer keeps one flat state under ``state[state_key]``: optimizer-wide values (``step``,
``shard``, ...), ``layers`` (one dict of tensors per Kronecker layer: factors, inverses or BFGS
matrices, averages, counters; empty on a rank that does not keep that layer) and ``fallback``
(one buffer per fallback parameter). Its ``state_dict()`` holds, with ``K = state_key + "_"``:

* a Kronecker layer's weight and bias: the layer's index in ``opt.layers`` (``K + "optimizer_
  layer"``: every parameter has an entry, as DCP requires), and in the weight's entry the
  layer's dict, its keys prefixed by ``K``;
* a fallback parameter: ``fallback_buffer``, shaped like the parameter;
* the first parameter of all: the optimizer-wide values, prefixed by ``K + "optimizer_"``.

Under FSDP2 a fallback buffer is a ``DTensor`` sharded like its parameter and a layer's tensors
are plain tensors, equal on every rank that keeps them: DCP saves each once and loads them on
any number of ranks (with K-FAC's ``distributed_mode="memory"`` a layer's inverses are kept by
its owner, and a rank asks for those of the layers it owns after the load). Under DDP a rank's
``state_dict()`` holds the layers it keeps: a per-rank file loads on the rank that saved it (on
another, the layers differ and the load raises ``ValueError``), a DCP checkpoint on any number
of ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from secant.distributed import local, sharded_like
from secant.layers import layer_params

FALLBACK = "fallback_buffer"


def _fallback_params(opt: Any) -> list[Tensor]:
    return [p for g in opt.fallback_groups for p in g["params"]]


def _prefixes(opt: Any) -> tuple[str, str]:
    """Key prefixes of the optimizer-wide values and of a layer's values."""
    return opt.state_key + "_optimizer_", opt.state_key + "_"


def own_storage(v: Any) -> Any:
    """A layer's tensor with a storage of its own: a view of a stack (K-BFGS keeps its layers'
    state in padded stacks, :mod:`secant.optim.layer_stacks`) is copied out, so a checkpoint
    holds the layer's entries alone."""
    if isinstance(v, Tensor) and v.untyped_storage().nbytes() != v.numel() * v.element_size():
        return v.clone(memory_format=torch.contiguous_format)
    return v


def param_entries(opt: Any, st: dict[str, Any]) -> dict[Tensor, dict[str, Any]]:
    """The per-parameter entries (see the module docstring) of the flat state ``st``."""
    glob, layer = _prefixes(opt)
    entries: dict[Tensor, dict[str, Any]] = {}
    for i, (m, ls) in enumerate(zip(opt.layers, st["layers"])):
        for p in layer_params(m):
            entries[p] = {glob + "layer": i}
        entries[m.weight].update({layer + k: own_storage(v) for k, v in ls.items()})
    for p, buf in zip(_fallback_params(opt), st["fallback"]):
        entries[p] = {FALLBACK: sharded_like(p, buf)}
    entries.setdefault(opt._params()[0], {}).update(
        {glob + k: v for k, v in st.items() if k not in ("layers", "fallback")})
    return entries


def flat_state(opt: Any, entries: dict[Tensor, dict[str, Any]]) -> dict[str, Any]:
    """The flat state held by ``entries``; ``ValueError`` if they miss the optimizer-wide values
    or a fallback buffer (whether it matches this optimizer is the caller's check)."""
    glob, layer = _prefixes(opt)
    st = {k[len(glob):]: v for k, v in entries.get(opt._params()[0], {}).items()
          if k.startswith(glob)}
    st.pop("layer", None)
    if "step" not in st:
        raise ValueError(f"state_dict was not saved by a {type(opt).__name__} optimizer over "
                         f"these parameters: no {glob + 'step'!r} for the first parameter")
    st["layers"] = [{k[len(layer):]: v for k, v in entries.get(m.weight, {}).items()
                     if k.startswith(layer) and not k.startswith(glob)} for m in opt.layers]
    fallback = []
    for p in _fallback_params(opt):
        if FALLBACK not in entries.get(p, {}):
            raise ValueError(f"state_dict has no {FALLBACK!r} for a parameter of a fallback "
                             "group (different model or parameter groups?)")
        fallback.append(local(entries[p][FALLBACK]))
    st["fallback"] = fallback
    return st
