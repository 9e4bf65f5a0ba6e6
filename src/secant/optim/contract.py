"""What ``torch.optim.Optimizer``'s generic machinery needs from an optimizer that keeps more
than ``defaults``, ``state`` and ``param_groups``, shared by every secant optimizer."""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from secant.optim.validation import check

# torch's hook registries: its own __getstate__ drops them (hooks are not copied), and so do we
_TORCH_HOOKS = frozenset({
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"})


class OptimizerContract(Optimizer):
    """``copy.deepcopy`` and pickling keep every attribute (the base class keeps three, and a
    copy then fails at its next step); :meth:`_load_hooked` runs the base ``load_state_dict``
    and hands over the state dict as the user's load pre-hooks left it."""

    #: ``step`` must be given a closure (K-BFGS evaluates the minibatch twice per step); read by
    #: frameworks that otherwise step without one (:mod:`secant.integrations.huggingface`).
    needs_closure: bool = False

    def __getstate__(self) -> dict[str, Any]:
        if any(getattr(self, g, None) is not None for g in ("_process_group", "_shard_group")):
            raise TypeError(f"a {type(self).__name__} running under a process group or FSDP2 "
                            "cannot be copied or pickled: save state_dict() on each rank (each "
                            "holds its own shard), or a torch.distributed.checkpoint, and load "
                            "it into a new optimizer")
        # compiled code is not copied either (a copy compiles its own, :meth:`_compiled`), nor
        # the wrapper an LR scheduler puts on this instance's ``step`` (torch.optim's own
        # copies drop it too: the scheduler tracks the original only)
        return {k: v for k, v in self.__dict__.items()
                if k not in _TORCH_HOOKS and k not in ("_compiled_fns", "step")}

    def _compiled(self, key: Hashable, fn: Callable) -> Callable:
        """``fn`` compiled with the optimizer's ``compile`` option (``True``: inductor, or a
        backend name; checked by :func:`check_compile`) as one ``fullgraph`` graph with static
        shapes, once per ``key`` (a graph break raises); ``fn`` itself without it. Each key
        compiles its own copy of ``fn``'s code: dynamo keeps graphs, and its limit of 8
        recompilations, per code object, so optimizers and calls with other shapes never
        share (or exhaust) one cache."""
        backend = getattr(self, "compile", False)
        if not backend:
            return fn
        cache = self.__dict__.setdefault("_compiled_fns", {})
        if key not in cache:
            cache[key] = torch.compile(_own_code(fn), fullgraph=True, dynamic=False,
                                       backend="inductor" if backend is True else backend)
        return cache[key]

    def _load_hooked(self, state_dict: dict[str, Any],
                     check: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """``Optimizer.load_state_dict(state_dict)``, with ``check`` (raise ``ValueError`` to
        refuse, before anything is loaded) and the return value seeing the state dict after
        every registered load pre-hook."""
        final: list[dict[str, Any]] = []

        def last_pre_hook(opt: Optimizer, sd: dict[str, Any]) -> None:
            check(sd)
            final.append(sd)

        handle = self.register_load_state_dict_pre_hook(last_pre_hook)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        return final[0]


def _own_code(fn: Callable) -> Callable:
    """``fn`` (a function or a ``functools.partial`` of one) as a function with its own copy of
    its code. A partial becomes a closure over its arguments: dynamo would otherwise compile
    the one wrapper frame it puts around every partial, so all would share one cache."""
    if isinstance(fn, functools.partial):
        func, args, keywords = _own_code(fn.func), fn.args, fn.keywords

        def bound(*more: Any, **more_keywords: Any) -> Any:
            return func(*args, *more, **keywords, **more_keywords)
        fn = bound
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def check_compile(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True``, ``False`` or a ``torch.compile``
    backend name (the ``compile`` option of the optimizers)."""
    backends = torch._dynamo.list_backends(exclude_tags=())
    check(isinstance(value, (bool, str)) and (not isinstance(value, str) or value in backends),
          "compile", value, f"True, False or a torch.compile backend ({', '.join(backends)})")


def check_lr(lr: Any) -> None:
    """Raise ``ValueError`` unless ``lr`` is a learning rate torch.optim accepts: a real number
    or a one-element real tensor (any shape), finite and >= 0."""
    if isinstance(lr, Tensor):
        ok = lr.numel() == 1 and lr.is_floating_point()
    else:
        ok = isinstance(lr, (int, float)) and not isinstance(lr, bool)
    check(ok and math.isfinite(float(lr)) and float(lr) >= 0.0, "lr", lr,
          "a finite value >= 0 (a number or a one-element tensor)")


def scalars(values: list[float | Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` (numbers or one-element tensors, e.g. the groups' learning rates) as one
    tensor: what may change from step to step enters a compiled step as data, not as a
    constant it would be recompiled for. No host sync: on a CUDA device the numbers go through
    pinned memory with a non-blocking copy (a copy from pageable memory waits for the
    stream)."""
    if any(isinstance(v, Tensor) for v in values):
        return torch.stack([torch.as_tensor(v, dtype=dtype, device=device).reshape(())
                            for v in values])
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
