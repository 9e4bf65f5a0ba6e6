"""Common base of the layer optimizers (:class:`~secant.KFAC`, :class:`~secant.KBFGS`,
:class:`~secant.KBFGSL`): layer discovery, hooks, parameter groups, the first-order fallback for
parameters of other modules, validation and exact ``state_dict`` round trips.

Parameter groups
----------------
``param_groups[0]`` (``"kind": "kronecker"``) holds the weights and biases of every supported
layer (``nn.Linear``; ``nn.Conv2d`` with ``groups=1``, integer padding, zero padding mode), in
``model.named_modules()`` order. ``param_groups[1]`` (``"kind": "fallback"``, present only if
non-empty) holds every other trainable parameter (norm layers, embeddings, unsupported convs,
layers passed in ``exclude``). Both groups carry ``lr`` (so every LR scheduler works) and the
optimizer's other per-group hyperparameters; ``fallback_lr`` sets the second group's ``lr``
(default: the same ``lr``).

State
-----
All state lives under one string key of ``self.state`` (``self.state[self.state_key]``): an
integer step counter, a list with one dict of tensors per layer, and the fallback buffers. Per-
layer tensors are kept in the parameters' dtype; decompositions run in at least float32
(:mod:`secant.linalg.kron`). ``load_state_dict`` checks every shape, copies every tensor and
moves it to the parameter's device, so a checkpoint loads into a freshly built model of the same
architecture and resumes bit for bit; checkpoints hold only tensors, numbers, lists and dicts
(``torch.load(..., weights_only=True)`` works).

Distributed data parallelism
----------------------------
With ``process_group`` (default: the default group when ``torch.distributed`` is initialised
with more than one rank) every rank runs the same model replica (typically wrapped in
``DistributedDataParallel``, which averages the parameter gradients) on its own equally sized
share of the global batch. Each layer is owned by one rank
(:func:`secant.distributed.assign_blocks`, balanced by the subclass's ``_layer_cost``;
``layer_owners`` lists them; a rank may own no layer). Per-layer batch statistics are
averaged over the ranks with one flat all-reduce per phase (all layers in one buffer); the
captured pre-activation gradients are gradients of each rank's *local* mean loss (DDP averages
only the parameter gradients), so the average of the local statistics over equally sized local
batches is the global-batch statistic; unequal local batches are not supported. Owners do
the curvature work of their layers and the resulting directions are shared, so every rank
applies the identical update and the run matches the single-process run on the global batch
(to rounding). ``distributed_mode`` chooses between
``"memory"`` (default: curvature state only on the owner) and ``"communication"`` (more state
on every rank, less per-step communication; see the subclass). At construction the ranks check
(one small all-gather) that they agree on the layers, their shapes and the options, and raise
``ValueError`` on every rank otherwise; every collective runs under the process group's
timeout.

Checkpoints are per rank: the state records ``"shard": [rank, world]`` and each rank saves and
loads its own ``state_dict`` (same world size and options); loading another rank's state raises
``ValueError``. Without a process group the shard is ``[0, 1]`` and nothing is communicated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from secant.distributed import all_reduce_flat, assign_blocks, check_consistent, resolve_group
from secant.layers import LayerCapture, is_supported, layer_params, matrix_shape
from secant.optim.validation import check

__all__ = ["DISTRIBUTED_MODES", "LayerOptimizer", "check", "check_finite_nonneg"]

DISTRIBUTED_MODES = ("memory", "communication")


def check_finite_nonneg(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    check(ok, name, value, "a finite value >= 0")


def _clone_tree(obj: Any, device: torch.device | None) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to(device=device, copy=True)
    if isinstance(obj, dict):
        return {k: _clone_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v, device) for v in obj]
    return obj


def _shape_tree(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype.is_floating_point)
    if isinstance(obj, dict):
        return {k: _shape_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shape_tree(v) for v in obj]
    return type(obj).__name__


class LayerOptimizer(Optimizer):
    """Base class: builds groups and hooks over ``model``; subclasses implement ``step``.

    Subclasses define ``state_key``, ``_fresh_layer_state(module, owned)`` (``owned``: this rank
    owns the layer) and may override ``_layer_cost`` and ``_setup_description``; they call
    ``self._fallback_step(...)`` for the parameters of other modules and ``self._all_reduce``
    for the statistics / directions they share.
    """

    state_key = "layer_optimizer"

    def __init__(self, model: nn.Module, defaults: dict[str, Any], *,
                 exclude: Iterable[nn.Module] = (), fallback_lr: float | None = None,
                 process_group: Any = None, distributed_mode: str = "memory") -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__}: expected an nn.Module (layer "
                             "optimizers are built over a model, not a parameter list)")
        check_finite_nonneg("lr", defaults["lr"])
        if fallback_lr is not None:
            check_finite_nonneg("fallback_lr", fallback_lr)
        check(distributed_mode in DISTRIBUTED_MODES, "distributed_mode", distributed_mode,
              f"one of {DISTRIBUTED_MODES}")
        excluded = {id(m) for m in exclude}
        layers: dict[str, nn.Module] = {}
        for name, m in model.named_modules():
            if id(m) not in excluded and is_supported(m):
                layers[name or type(m).__name__] = m
        seen: set[int] = set()
        kron_params: list[Tensor] = []
        for name, m in layers.items():
            for p in layer_params(m):
                if id(p) in seen:
                    raise ValueError(f"layer {name!r} shares a parameter with another layer; "
                                     "exclude one of them with `exclude=`")
                if not p.requires_grad:
                    raise ValueError(f"layer {name!r} has a frozen bias; exclude it")
                seen.add(id(p))
                kron_params.append(p)
        other = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
        if not kron_params and not other:
            raise ValueError("model has no trainable parameters")
        groups: list[dict[str, Any]] = []
        if kron_params:
            groups.append({"params": kron_params, "kind": "kronecker"})
        if other:
            fb: dict[str, Any] = {"params": other, "kind": "fallback"}
            if fallback_lr is not None:
                fb["lr"] = fallback_lr
            groups.append(fb)
        super().__init__(groups, defaults)
        self.model = model
        self.layer_names = list(layers)
        self.layers = list(layers.values())
        self.distributed_mode = distributed_mode
        self._group, self._rank, self._world = resolve_group(process_group)
        shapes = [matrix_shape(m) for m in self.layers]
        self.layer_owners = [0] * len(shapes)
        if self._group is not None:
            for r, shard in enumerate(assign_blocks([self._layer_cost(*s) for s in shapes],
                                                    self._world)):
                for i in shard:
                    self.layer_owners[i] = r
            other_shapes = [tuple(p.shape) for p in other]
            setup = (f"{type(self).__name__} mode={distributed_mode} "
                     f"layers={list(zip(self.layer_names, shapes))} other={other_shapes} "
                     f"dtypes={sorted({str(p.dtype) for p in kron_params + other})} "
                     f"defaults={sorted(defaults.items())} fallback_lr={fallback_lr} "
                     f"{self._setup_description()}")
            device = (kron_params + other)[0].device
            check_consistent(setup, self._group, device,
                             f"the layers, parameter shapes or {type(self).__name__} options")
        self._owned = [o == self._rank for o in self.layer_owners]
        self.capture = LayerCapture(model, layers)
        self.state[self.state_key] = self._fresh_state()

    # ------------------------------------------------------------------ groups
    @property
    def kron_group(self) -> dict[str, Any] | None:
        g = self.param_groups[0]
        return g if g["kind"] == "kronecker" else None

    @property
    def fallback_group(self) -> dict[str, Any] | None:
        g = self.param_groups[-1]
        return g if g["kind"] == "fallback" else None

    # ------------------------------------------------------------------ distributed
    def _layer_cost(self, d_out: int, d_in: int) -> int:
        """Relative curvature work of a ``d_out × d_in`` layer, to balance ownership."""
        return d_in ** 3 + d_out ** 3

    def _setup_description(self) -> str:
        """Options the ranks must agree on (checked at construction)."""
        return ""

    @property
    def distributed(self) -> bool:
        """Whether this optimizer communicates (a process group with more than one rank)."""
        return self._group is not None

    def _all_reduce(self, tensors: list[Tensor], average: bool = False) -> list[Tensor]:
        """Sum / mean of ``tensors`` over the ranks, one flat all-reduce (identity if single)."""
        if self._group is None:
            return tensors
        return all_reduce_flat(tensors, self._group, average=average)

    # ------------------------------------------------------------------ state
    def _fresh_layer_state(self, module: nn.Module, owned: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _fresh_state(self) -> dict[str, Any]:
        fb = self.fallback_group
        return {
            "step": 0,
            "shard": [self._rank, self._world],
            "layers": [self._fresh_layer_state(m, own)
                       for m, own in zip(self.layers, self._owned)],
            "fallback": [torch.zeros_like(p) for p in (fb["params"] if fb else [])],
        }

    @property
    def _st(self) -> dict[str, Any]:
        return self.state[self.state_key]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"].get(self.state_key)
        fresh = self._fresh_state()
        if saved is None:
            raise ValueError(f"state_dict was not saved by a {type(self).__name__} optimizer")
        if list(saved.get("shard", [0, 1])) != fresh["shard"]:
            raise ValueError(f"state_dict holds the shard (rank, world) = {saved.get('shard')}, "
                             f"this optimizer is {fresh['shard']}: each rank loads its own state")
        if _shape_tree(saved) != _shape_tree(fresh):
            raise ValueError(f"state_dict does not match this {type(self).__name__}: different "
                             "model architecture or optimizer options")
        super().load_state_dict(state_dict)
        device = self.param_groups[0]["params"][0].device
        self.state[self.state_key] = _clone_tree(saved, device)

    def remove_hooks(self) -> None:
        """Remove the capture hooks from the model (the optimizer can no longer step)."""
        self.capture.remove()

    # ------------------------------------------------------------------ fallback
    @torch.no_grad()
    def _fallback_step(self, mode: str, rho: float = 0.0) -> None:
        """First-order update of the fallback group (parameters of unsupported modules).

        ``mode="heavy_ball"`` (K-FAC): ``d = ∇ + wd·θ``, ``u ← μ u + d``, ``θ ← θ − η u`` with
        ``u`` starting at 0 — the same iterates as :class:`torch.optim.SGD` (no dampening).
        ``mode="ema"`` (K-BFGS): the gradient EMA the layers use, ``ĝ ← ρ ĝ + (1 − ρ)(∇ + wd·θ)``,
        ``θ ← θ − η ĝ`` — the K-BFGS step with identity preconditioner.
        Parameters without a gradient are left alone.
        """
        fb = self.fallback_group
        if fb is None:
            return
        bufs = self._st["fallback"]
        ps, gs, us = [], [], []
        for p, u in zip(fb["params"], bufs):
            if p.grad is not None:
                ps.append(p)
                gs.append(p.grad)
                us.append(u)
        if not ps:
            return
        wd = fb.get("weight_decay", 0.0)
        if wd:
            d = torch._foreach_add(gs, ps, alpha=wd)
        else:
            d = list(gs)
        if mode == "heavy_ball":
            torch._foreach_mul_(us, fb["momentum"])
            torch._foreach_add_(us, d)
        else:
            torch._foreach_lerp_(us, d, 1.0 - rho)
        torch._foreach_add_(ps, us, alpha=-fb["lr"])
