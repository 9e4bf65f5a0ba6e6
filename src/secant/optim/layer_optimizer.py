"""Common base of the layer optimizers (:class:`~secant.KFAC`, :class:`~secant.KBFGS`,
:class:`~secant.KBFGSL`): layer discovery, hooks, parameter groups, the first-order fallback for
parameters of other modules, validation and exact ``state_dict`` round trips.

Parameter groups
----------------
Every group has a ``"kind"``: ``"kronecker"`` groups hold weights and biases of supported layers
(``nn.Linear``; ``nn.Conv2d`` with ``groups=1``, integer padding, zero padding mode; found in
``model.named_modules()`` order), ``"fallback"`` groups every other trainable parameter (norm
layers, embeddings, unsupported convs, layers passed in ``exclude``, the projections of
``nn.MultiheadAttention``: its ``out_proj`` is an ``nn.Linear`` that attention calls through the
functional form, so hooks never see it; a one-time warning names such modules). Without
``param_groups`` there is one group of each kind (kronecker first); ``fallback_lr`` sets the
fallback group's ``lr`` (default: the same ``lr``). Every group carries ``lr`` (so every LR
scheduler works) and the optimizer's other hyperparameters (``lr``, ``damping``, ``momentum``,
``weight_decay``).

``param_groups=[{"params": [...]} | {"modules": [...]}, options], ...]`` sets options per
parameter: entries apply in order, each to the parameters it names (``"modules"``: all
parameters of those modules), a later entry overriding the options it sets; the parameters are
then grouped by kind and options (e.g. ``[{"params": biases_and_norms, "weight_decay": 0.0},
{"modules": [model.head], "lr": 0.01}]``). A Kronecker layer is one matrix ``W̃ = [W, b]``: its
weight and bias must share ``lr``, ``momentum`` and ``damping`` (else ``ValueError`` naming the
layer) but may have different ``weight_decay``, which is applied to their own columns of ``W̃``.

``add_param_group`` accepts parameters of the model that the optimizer does not hold yet: the
complete parameter sets of supported layers become new Kronecker layers (hooks and fresh state),
the others a fallback group with fresh buffers (a mixed group is split in two). Not with a
process group (``ValueError``): layer ownership is fixed at construction.

Dtypes
------
``factor_dtype`` (default: float32 when a Kronecker parameter is bf16 / fp16, else the
parameters' dtype) is the dtype of all curvature state and math: captured inputs and pre-
activation gradients are cast to it (also those of an autocast forward), per-layer state
(factors, inverses, BFGS matrices, L-BFGS histories, momentum / gradient EMAs) is kept in it,
and the update is rounded to the parameters' dtype when it is added. ``step`` runs the
curvature math with autocast disabled (a closure still runs under the caller's autocast).
Fallback buffers are kept in their parameters' dtype. With ``torch.amp.GradScaler`` pass
``grad_scaler=scaler``: captured pre-activation gradients are divided by the scale in force at
their backward, and an overflowing micro-batch (whose step the scaler skips) is left out of the
statistics (:mod:`secant.layers.capture`).

Steps without data
------------------
A registered layer whose forward/backward did not run since the last step gets no curvature
update in this step; one without any gradient (``.grad`` is ``None``) is not updated at all, as
``torch.optim`` does. Several forward/backward passes between steps (gradient accumulation)
contribute the mean of their statistics.

State
-----
All state lives under one string key of ``self.state`` (``self.state[self.state_key]``): an
integer step counter, a list with one dict of tensors per layer (K-BFGS: views of its padded
layer stacks, :mod:`secant.optim.layer_stacks`), and the fallback buffers. Per-
layer tensors are kept in ``factor_dtype``; decompositions run in at least float32
(:mod:`secant.linalg.kron`). ``state_dict()`` lays it out per parameter, in ``torch.optim``'s
format (a layer's state in its weight's entry, :mod:`secant.optim.layer_state`), so
``torch.distributed.checkpoint`` can save and reshard it. ``load_state_dict`` checks every
shape, copies every tensor and moves it to the parameter's device, so a checkpoint loads into a
freshly built model of the same architecture and resumes bit for bit; checkpoints hold only
tensors, numbers, lists and dicts (``torch.load(..., weights_only=True)`` works).

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

Checkpoints: each rank's ``state_dict`` holds the layers it keeps (and records ``"shard":
[rank, world]``); a rank loads its own file (same world size and options; another rank's state
raises ``ValueError``), or a ``torch.distributed.checkpoint`` of any number of ranks. Without a
process group the shard is ``[0, 1]`` and nothing is communicated.

FSDP2 and HSDP
--------------
Over a model sharded by ``fully_shard`` (every trainable parameter a ``DTensor`` split on dim 0
over one mesh dimension, replicated over the other with HSDP; the mesh spans every rank) the
optimizer runs on the same global-batch quantities as one process (design K1 of the FSDP2
notes, with the state split by layers as under DDP instead of by rows): the capture hooks see
FSDP2's unsharded forward and backward, so each rank captures full-width statistics of its
local batch, averaged over all ranks as above; every rank gathers each layer's gradient ``∇W̃``
(already averaged by FSDP2's reduce-scatter), and ``W̃`` where weight decay needs it, whole
(one all-gather per tensor; K-BFGS gathers ``∇θ + wd·θ`` at once); the curvature work and
state are split over the layers' owners by ``distributed_mode`` as under DDP (``"memory"``:
owners compute the directions, which are all-reduced); each rank adds the rows of its own shard.
K-FAC's momentum is kept whole on every rank; the fallback groups run on the local shards. A
DCP checkpoint (``get_optimizer_state_dict`` / ``dcp.save``) loads on any number of ranks.
Exact (equal to one process on the global batch to rounding, also across a DCP save and a load
on another number of ranks: ``tests/distributed/test_fsdp2.py``), not yet memory-lean: a
layer's state is not split by rows (``benchmarks/fsdp2_scaling.md`` measures what each rank
keeps and sends). Refused with ``ValueError`` at construction: a partly sharded model, other
placements (tensor parallel), a mesh that does not span every rank, ``process_group=``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from secant.distributed import (
    all_reduce_flat,
    assign_blocks,
    check_consistent,
    local,
    resolve_group,
    shard_group,
)
from secant.layers import (
    LayerCapture,
    grad_matrix,
    is_supported,
    layer_params,
    matrix_shape,
    param_matrix,
)
from secant.optim import layer_state
from secant.optim.contract import OptimizerContract
from secant.optim.validation import check

__all__ = ["DISTRIBUTED_MODES", "LayerOptimizer", "check", "check_finite_nonneg",
           "curvature_step"]

DISTRIBUTED_MODES = ("memory", "communication")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_finite_nonneg(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    check(ok, name, value, "a finite value >= 0")


def _check_option(key: str, value: Any) -> None:
    """Validate one per-group hyperparameter (``param_groups`` entries, ``add_param_group``)."""
    if key in ("lr", "weight_decay"):
        check_finite_nonneg(key, value)
    elif key == "damping":
        check(isinstance(value, (int, float)) and 0 < value < math.inf, key, value,
              "a finite value > 0")
    elif key == "momentum":
        check(isinstance(value, (int, float)) and 0 <= value < 1, key, value,
              "a value in [0, 1)")


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


def curvature_step(step: Callable) -> Callable:
    """Decorator of the subclasses' ``step``: no autograd and no autocast for the optimizer's own
    math (curvature state is in ``factor_dtype``); the closure runs with grad enabled under the
    autocast state the caller had. A step inside an autocast region clears autocast's cache of
    cast weights afterwards (the parameters changed in place, the cached copies are stale)."""
    @functools.wraps(step)
    def wrapper(self: LayerOptimizer, closure: Callable[[], Any] | None = None) -> Any:
        if not self.capture.attached:
            raise RuntimeError(
                f"this {type(self).__name__}'s capture hooks were removed (remove_hooks(), or a "
                "newer optimizer over the same layers took them over); build a new optimizer")
        dev = self._device.type
        autocast = torch.is_autocast_enabled(dev)
        if closure is not None and autocast:
            user, dtype = closure, torch.get_autocast_dtype(dev)

            def closure() -> Any:  # noqa: F811 - the caller's closure under its autocast
                with torch.autocast(dev, dtype=dtype), torch.enable_grad():
                    return user()
        with torch.no_grad(), torch.autocast(dev, enabled=False):
            out = step(self, closure)
        if autocast:
            torch.clear_autocast_cache()
        return out
    return wrapper


def _loss_scale(scaler: Any) -> Tensor | None:
    """The scale of a ``GradScaler`` (``None`` while it has not scaled a loss); a function of
    the scaler alone, so the capture holds no reference back to its optimizer."""
    if not scaler.is_enabled():
        return None
    return getattr(scaler, "_scale", None)


class LayerOptimizer(OptimizerContract):
    """Base class: builds groups and hooks over ``model``; subclasses implement ``step``
    (decorated with :func:`curvature_step`).

    Subclasses define ``state_key``, ``_fresh_layer_state(module, owned)`` (``owned``: this rank
    owns the layer; tensors in ``self.factor_dtype``) and may override ``_layer_cost`` and
    ``_setup_description``; per layer ``i`` they read their hyperparameters from
    :meth:`layer_group` and the (weight-decayed) gradient from :meth:`_layer_grad`, and call
    ``self._fallback_step(...)`` for the fallback groups and ``self._all_reduce`` for the
    statistics / directions they share.
    """

    state_key = "layer_optimizer"

    def __init__(self, model: nn.Module, defaults: dict[str, Any], *,
                 exclude: Iterable[nn.Module] = (), fallback_lr: float | None = None,
                 param_groups: list[dict[str, Any]] | None = None,
                 factor_dtype: torch.dtype | None = None,
                 grad_scaler: Any = None,
                 process_group: Any = None, distributed_mode: str = "memory") -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__}: expected an nn.Module (layer "
                             "optimizers are built over a model, not a parameter list)")
        self.sharded = self._fsdp2(model, process_group)
        check_finite_nonneg("lr", defaults["lr"])
        if fallback_lr is not None:
            check_finite_nonneg("fallback_lr", fallback_lr)
        check(distributed_mode in DISTRIBUTED_MODES, "distributed_mode", distributed_mode,
              f"one of {DISTRIBUTED_MODES}")
        check(factor_dtype is None or (isinstance(factor_dtype, torch.dtype)
                                       and factor_dtype.is_floating_point),
              "factor_dtype", factor_dtype, "None or a floating torch.dtype")
        check(grad_scaler is None or hasattr(grad_scaler, "scale"), "grad_scaler",
              grad_scaler, "None or a torch.amp.GradScaler")
        self._built = False
        self.model = model
        layers = self._discover(model, exclude)
        seen: set[int] = set()
        for name, m in layers.items():
            for p in layer_params(m):
                if not p.requires_grad:
                    raise ValueError(f"layer {name!r} has a frozen bias; exclude it")
                seen.add(id(p))
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no trainable parameters")
        kron_params = [p for m in layers.values() for p in layer_params(m)]
        other = [p for p in trainable if id(p) not in seen]
        options = {id(p): {} for p in trainable}
        if fallback_lr is not None:
            for p in other:
                options[id(p)]["lr"] = fallback_lr
        self._apply_group_spec(param_groups, options, defaults)
        groups = self._make_groups(kron_params, "kronecker", options) + \
            self._make_groups(other, "fallback", options)
        super().__init__(groups, defaults)
        self.layer_names = list(layers)
        self.layers = list(layers.values())
        self.distributed_mode = distributed_mode
        low = any(p.dtype in _LOW_PRECISION for p in kron_params)
        self.factor_dtype = factor_dtype or (torch.float32 if low or not kron_params
                                             else kron_params[0].dtype)
        self.grad_scaler = grad_scaler
        self._device = trainable[0].device
        self._process_group, self._rank, self._world = resolve_group(process_group)
        shapes = [matrix_shape(m) for m in self.layers]
        self.layer_owners = [0] * len(shapes)
        if self._process_group is not None:
            for r, shard in enumerate(assign_blocks([self._layer_cost(*s) for s in shapes],
                                                    self._world)):
                for i in shard:
                    self.layer_owners[i] = r
            other_shapes = [tuple(p.shape) for p in other]
            setup = (f"{type(self).__name__} mode={distributed_mode} "
                     f"layers={list(zip(self.layer_names, shapes))} other={other_shapes} "
                     f"dtypes={sorted({str(p.dtype) for p in trainable})} "
                     f"defaults={sorted(defaults.items())} fallback_lr={fallback_lr} "
                     f"factor_dtype={self.factor_dtype} "
                     f"groups={[sorted((k, v) for k, v in g.items() if k != 'params') for g in self.param_groups]} "  # noqa: E501
                     f"{self._setup_description()}")
            check_consistent(setup, self._process_group, self._device,
                             f"the layers, parameter shapes or {type(self).__name__} options")
        self._owned = [o == self._rank for o in self.layer_owners]
        self._index_groups()
        self.capture = LayerCapture(model, layers, dtype=self.factor_dtype,
                                    grad_scale=(functools.partial(_loss_scale, grad_scaler)
                                                if grad_scaler else None),
                                    owner=type(self).__name__)
        self.state[self.state_key] = self._fresh_state()
        self._built = True
        share = self.coverage()["kronecker_fraction"]
        if share < 0.5:
            warnings.warn(
                f"{type(self).__name__}: only {share:.1%} of the trainable parameters get "
                "Kronecker curvature, the rest the first-order fallback update; "
                "opt.coverage() lists which (register other linear-like layers with "
                "secant.layers.register_layer)", stacklevel=3)

    def _fsdp2(self, model: nn.Module, process_group: Any) -> bool:
        """Whether the model is sharded by FSDP2 / HSDP (see "FSDP2" in the module docstring);
        ``ValueError`` for a layout that is not supported."""
        name = type(self).__name__
        params = [p for p in model.parameters() if p.requires_grad]
        if shard_group(params, name) is None:
            return False
        if not all(isinstance(p, DTensor) for p in params):
            raise ValueError(f"{name} under FSDP2 needs every trainable parameter sharded (a "
                             "DTensor): shard the whole model with fully_shard")
        if process_group is not None:
            raise ValueError("process_group: not with FSDP2 parameters (statistics are "
                             "averaged over every rank of the device mesh)")
        if params[0].device_mesh.size() != dist.get_world_size():
            raise ValueError(f"{name} under FSDP2 needs a device mesh over every rank (got "
                             f"{params[0].device_mesh.size()} of {dist.get_world_size()})")
        return True

    # ------------------------------------------------------------------ discovery
    @staticmethod
    def _discover(model: nn.Module, exclude: Iterable[nn.Module]) -> dict[str, nn.Module]:
        """Supported layers of ``model`` that are not excluded and whose forward runs (the
        ``out_proj`` of ``nn.MultiheadAttention`` does not: it goes to the fallback)."""
        excluded = {id(m) for m in exclude}
        bypassed = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                bypassed[id(m.out_proj)] = f"{name}.out_proj" if name else "out_proj"
        names: dict[int, list[str]] = {}  # every name of each parameter: tied ones have several
        for pname, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(pname)
        skipped, tied = [], []
        layers: dict[str, nn.Module] = {}
        for name, m in model.named_modules():
            if id(m) in excluded or not is_supported(m):
                continue
            if id(m) in bypassed:
                skipped.append(bypassed[id(m)])
                continue
            shared = [n for p in layer_params(m) if len(names[id(p)]) > 1 for n in names[id(p)]]
            if shared:
                tied.append(f"{name or type(m).__name__} ({' = '.join(shared)})")
                continue
            layers[name or type(m).__name__] = m
        if skipped:
            warnings.warn(
                f"{', '.join(skipped)}: nn.MultiheadAttention calls its out_proj through "
                "the functional form (no forward hooks), so it and in_proj_weight get the "
                "first-order fallback update instead of Kronecker curvature", stacklevel=4)
        if tied:
            warnings.warn(
                f"{'; '.join(tied)}: parameters shared with another part of the model (tied "
                "weights); factors built from one use would precondition the gradient of all "
                "uses, so these layers get the first-order fallback update instead of "
                "Kronecker curvature", stacklevel=4)
        return layers

    # ------------------------------------------------------------------ groups
    def _apply_group_spec(self, spec: list[dict[str, Any]] | None,
                          options: dict[int, dict[str, Any]], defaults: dict[str, Any]) -> None:
        if spec is None:
            return
        check(isinstance(spec, (list, tuple)), "param_groups", type(spec).__name__,
              "a list of dicts")
        for k, entry in enumerate(spec):
            check(isinstance(entry, dict) and (("params" in entry) != ("modules" in entry)),
                  f"param_groups[{k}]", entry,
                  "a dict with exactly one of 'params' or 'modules' and options")
            for key, value in entry.items():
                if key in ("params", "modules"):
                    continue
                check(key in defaults, f"param_groups[{k}] key", key,
                      f"one of {sorted(defaults)}")
                _check_option(key, value)
            for p in self._entry_params(entry):
                if id(p) not in options:
                    raise ValueError(f"param_groups[{k}] names a parameter of shape "
                                     f"{tuple(p.shape)} that is not a trainable parameter of "
                                     "the model")
                options[id(p)].update({key: v for key, v in entry.items()
                                       if key not in ("params", "modules")})

    @staticmethod
    def _entry_params(entry: dict[str, Any]) -> list[Tensor]:
        if "modules" in entry:
            mods = entry["modules"]
            mods = [mods] if isinstance(mods, nn.Module) else list(mods)
            return [p for m in mods for p in m.parameters() if p.requires_grad]
        ps = entry["params"]
        return [ps] if isinstance(ps, Tensor) else list(ps)

    @staticmethod
    def _make_groups(params: list[Tensor], kind: str,
                     options: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Parameters grouped by their options, in order of first appearance."""
        groups: dict[tuple, dict[str, Any]] = {}
        for p in params:
            opts = options.get(id(p), {})
            key = tuple(sorted(opts.items()))
            if key not in groups:
                groups[key] = {"params": [], "kind": kind, **opts}
            groups[key]["params"].append(p)
        return list(groups.values())

    def _index_groups(self) -> None:
        """Where each layer's weight and bias live; checks that they share lr/momentum/damping."""
        where = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        self._layer_groups: list[tuple[int, int | None]] = []
        for name, m in zip(self.layer_names, self.layers):
            gw = where[id(m.weight)]
            gb = None if m.bias is None else where[id(m.bias)]
            if gb is not None:
                a, b = self.param_groups[gw], self.param_groups[gb]
                for key in ("lr", "momentum", "damping"):
                    if key in a and a[key] != b[key]:
                        raise ValueError(
                            f"layer {name!r}: its weight and bias have {key}={a[key]} and "
                            f"{key}={b[key]}; a Kronecker layer is one matrix [W, b], only "
                            "weight_decay may differ between them (or exclude the layer)")
            self._layer_groups.append((gw, gb))

    def layer_group(self, i: int) -> dict[str, Any]:
        """The parameter group of layer ``i``'s weight (its lr, momentum, damping)."""
        return self.param_groups[self._layer_groups[i][0]]

    def _has_grad(self, i: int) -> bool:
        """Whether layer ``i``'s weight or bias has a gradient."""
        m = self.layers[i]
        return m.weight.grad is not None or (m.bias is not None and m.bias.grad is not None)

    def _layer_weight_decay(self, i: int) -> list[float]:
        """The weight decay of each of layer ``i``'s parameters (weight, then bias)."""
        gw, gb = self._layer_groups[i]
        groups = [gw] if self.layers[i].bias is None else [gw, gw if gb is None else gb]
        return [self.param_groups[g]["weight_decay"] for g in groups]

    def _layer_grad(self, i: int) -> Tensor | None:
        """``X = ∇W̃ + [wd_W·W, wd_b·b]`` of layer ``i`` in ``factor_dtype`` (each column block
        with its own group's weight decay); ``None`` if neither weight nor bias has a gradient."""
        if not self._has_grad(i):
            return None
        m = self.layers[i]
        x = grad_matrix(m, self.factor_dtype)
        decay = self._layer_weight_decay(i)
        wd_w, wd_b = decay[0], decay[-1]  # (one value without a bias)
        if wd_w and wd_w == wd_b:
            x.add_(param_matrix(m, self.factor_dtype), alpha=wd_w)
        elif wd_w or wd_b:
            w = param_matrix(m, self.factor_dtype)
            x[:, :-1].add_(w[:, :-1], alpha=wd_w)
            x[:, -1].add_(w[:, -1], alpha=wd_b)
        return x

    def coverage(self) -> dict[str, Any]:
        """Which trainable parameters get Kronecker curvature: ``{"kronecker": {layer name:
        scalars}, "first_order": {parameter name: scalars}, "kronecker_fraction": share of
        the trainable scalars under curvature}`` (tied parameters are named once)."""
        kron = {name: sum(p.numel() for p in layer_params(m))
                for name, m in zip(self.layer_names, self.layers)}
        fallback = {id(p) for g in self.param_groups if g["kind"] == "fallback"
                    for p in g["params"]}
        first = {name: p.numel() for name, p in self.model.named_parameters()
                 if id(p) in fallback}
        total = sum(kron.values()) + sum(first.values())
        return {"kronecker": kron, "first_order": first,
                "kronecker_fraction": sum(kron.values()) / total if total else 0.0}

    @property
    def kron_group(self) -> dict[str, Any] | None:
        """The first Kronecker group (``None`` if the optimizer has no Kronecker layer)."""
        return next((g for g in self.param_groups if g["kind"] == "kronecker"), None)

    @property
    def fallback_groups(self) -> list[dict[str, Any]]:
        return [g for g in self.param_groups if g["kind"] == "fallback"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters of ``model`` the optimizer does not hold yet (see the module
        docstring): whole supported layers become Kronecker layers with fresh state, other
        parameters a fallback group with fresh buffers. ``"modules"`` may replace
        ``"params"``."""
        if not self._built:
            super().add_param_group(param_group)
            return
        if self.distributed:
            raise ValueError(f"{type(self).__name__}.add_param_group is not supported with a "
                             "process group (layer ownership is fixed at construction); build "
                             "the optimizer over the final model")
        group = dict(param_group)
        params = self._entry_params(group)
        group.pop("modules", None)
        for key, value in group.items():
            if key not in ("params", "kind"):
                _check_option(key, value)
        new = {id(p) for p in params}
        layers = {n: m for n, m in self._discover(self.model, ())
                  .items() if all(id(p) in new for p in layer_params(m))}
        kron = [p for m in layers.values() for p in layer_params(m)]
        in_kron = {id(p) for p in kron}
        other = [p for p in params if id(p) not in in_kron]
        opts = {k: v for k, v in group.items() if k not in ("params", "kind")}
        for kind, ps in (("kronecker", kron), ("fallback", other)):
            if ps:
                super().add_param_group({"params": ps, **opts, "kind": kind})
        st = self._st
        for name, m in layers.items():
            self.layer_names.append(name)
            self.layers.append(m)
            self.layer_owners.append(0)
            self._owned.append(True)
            st["layers"].append(self._fresh_layer_state(m, True))
        st["fallback"].extend(torch.zeros_like(local(p)) for p in other)
        self._index_groups()
        if layers:
            self.capture.add_layers(layers)

    # ------------------------------------------------------------------ dtypes
    @contextmanager
    def _batchnorm_frozen(self) -> Iterator[None]:
        """Restore the BatchNorm running statistics (and counters) after the block: an extra
        forward on the same batch (K-BFGS's second pass) must not move them a second time."""
        bufs = [b for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.training for b in m.buffers()]
        saved = [b.clone() for b in bufs]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, s in zip(bufs, saved):
                    b.copy_(s)

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
        return self._process_group is not None

    def _all_reduce(self, tensors: list[Tensor], average: bool = False) -> list[Tensor]:
        """Sum / mean of ``tensors`` over the ranks, one flat all-reduce (identity if single)."""
        if self._process_group is None:
            return tensors
        return all_reduce_flat(tensors, self._process_group, average=average)

    # ------------------------------------------------------------------ state
    def _fresh_layer_state(self, module: nn.Module, owned: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _fresh_state(self) -> dict[str, Any]:
        return {
            "step": 0,
            "shard": [self._rank, self._world],
            "layers": [self._fresh_layer_state(m, own)
                       for m, own in zip(self.layers, self._owned)],
            "fallback": [torch.zeros_like(local(p)) for g in self.fallback_groups
                         for p in g["params"]],
        }

    @property
    def _st(self) -> dict[str, Any]:
        return self.state[self.state_key]

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` format, every entry keyed by a parameter (what
        ``torch.distributed.checkpoint`` needs): a layer's state in the entry of its weight, a
        fallback buffer in its parameter's, the optimizer-wide values in the first parameter's
        (:mod:`secant.optim.layer_state`)."""
        sd = super().state_dict()
        flat = sd["state"].pop(self.state_key)
        index = {p: i for i, p in enumerate(self._params())}  # tensors hash by identity
        sd["state"] = {index[p]: e for p, e in layer_state.param_entries(self, flat).items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fresh = self._fresh_state()
        params = self._params()

        def flat(sd: dict[str, Any]) -> dict[str, Any]:
            ids = [i for g in sd["param_groups"] for i in g["params"]]
            return layer_state.flat_state(
                self, {p: sd["state"][i] for i, p in zip(ids, params) if i in sd["state"]})

        def check_saved(sd: dict[str, Any]) -> None:
            saved = flat(sd)
            if _shape_tree(saved) == _shape_tree(fresh):
                return  # this rank's layers (a DCP load: whatever rank or world saved them)
            if list(saved["shard"]) != fresh["shard"]:
                raise ValueError(f"state_dict holds the shard (rank, world) = "
                                 f"{saved['shard']}, this optimizer is {fresh['shard']}: "
                                 "each rank loads its own state (or use "
                                 "torch.distributed.checkpoint, which reshards it)")
            raise ValueError(f"state_dict does not match this {type(self).__name__}: "
                             "different model architecture or optimizer options")

        # from the saved dict, not from self.state: the base class casts every tensor there
        # to its parameter's dtype (the counters too)
        st = _clone_tree(flat(self._load_hooked(state_dict, check_saved)), self._device)
        st["shard"] = fresh["shard"]
        self.state.clear()
        self.state[self.state_key] = st

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def remove_hooks(self) -> None:
        """Remove the capture hooks from the model (the optimizer can no longer step)."""
        self.capture.remove()

    # ------------------------------------------------------------------ fallback
    def _fallback_step(self, mode: str, rho: float | None = None) -> None:
        """First-order update of the fallback groups (parameters of unsupported modules).

        ``mode="heavy_ball"`` (K-FAC): ``d = ∇ + wd·θ``, ``u ← μ u + d``, ``θ ← θ − η u`` with
        ``u`` starting at 0 — the same iterates as :class:`torch.optim.SGD` (no dampening).
        ``mode="ema"`` (K-BFGS): the gradient EMA the layers use, ``ĝ ← ρ ĝ + (1 − ρ)(∇ + wd·θ)``,
        ``θ ← θ − η ĝ`` — the K-BFGS step with identity preconditioner (ρ: the group's
        ``momentum``). ``lr``, ``momentum`` and ``weight_decay`` are per group; parameters
        without a gradient are left alone.
        """
        bufs = iter(self._st["fallback"])
        for fb in self.fallback_groups:
            ps, gs, us = [], [], []
            for p in fb["params"]:
                u = next(bufs)
                if p.grad is not None:
                    ps.append(local(p))
                    gs.append(local(p.grad))
                    us.append(u)
            if not ps:
                continue
            wd = fb.get("weight_decay", 0.0)
            d = torch._foreach_add(gs, ps, alpha=wd) if wd else list(gs)
            if mode == "heavy_ball":
                torch._foreach_mul_(us, fb["momentum"])
                torch._foreach_add_(us, d)
            else:
                torch._foreach_lerp_(us, d, 1.0 - fb["momentum"])
            torch._foreach_add_(ps, us, alpha=-fb["lr"])
