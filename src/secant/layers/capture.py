"""Hooks that capture what Kronecker-factored optimizers need from ``nn.Linear`` / ``nn.Conv2d``.

For a supported layer the weight is viewed as one matrix ``W̃ = [W, b] ∈ R^{d_out × (d_in+1)}``
(bias as the last column — the homogeneous coordinate; no extra column when the layer has no
bias). Conv2d weights ``[d_out, C, kh, kw]`` flatten to ``d_in = C·kh·kw``, matching
``F.unfold``'s patch order, so a convolution is the matrix product of ``W̃`` with the unfolded
patches of its input (Grosse & Martens 2016).

Each call of a registered layer (a forward in grad mode and, when gradients are wanted, the
backward through its output) yields a :class:`LayerRecord`:

* ``x`` — the layer input (detached); :func:`homogeneous_inputs` turns it into ``ā [N, T, d_in+1]``
  (``T = 1`` for a Linear layer on ``[N, d]`` inputs, ``T`` = spatial positions for conv, extra
  leading dimensions of a Linear input also count as positions);
* ``h_mean`` — the batch-and-position mean of the pre-activation output, ``[d_out]`` (only when
  asked for: K-BFGS);
* ``g`` — the gradient of the loss w.r.t. the pre-activation output, reshaped ``[N, T, d_out]``.

All three are cast to the capture's ``dtype`` (the optimizer's ``factor_dtype``; float32 for a
bf16 / fp16 or autocast model) and ``g`` is divided by the current loss scale when a
``grad_scale`` source is given (``torch.amp.GradScaler``). As soon as a call is complete the
optimizer's ``reduce`` turns it into a few statistics tensors (e.g. K-FAC's ``Â``, ``Ĝ``), which
are summed; :meth:`LayerCapture.collect` returns their mean over the calls. So several forward/
backward pairs between two steps (gradient accumulation over micro-batches) give the mean of the
micro-batch statistics, and no activations are kept across calls. A call whose statistics are
not all finite (an overflowing fp16 micro-batch, whose step ``GradScaler`` skips) is left out of
the mean once a layer has more than one call; if every call of a layer was left out its mean is
NaN. A layer's only call is returned as ``reduce`` made it, with no test and no copy (the usual
case: one forward/backward per step), so its statistics may be non-finite. Either way non-finite
statistics are the optimizers' to reject (each tests a statistic set once, e.g. through the
diagonal of a Gram matrix).

Capturing is only on between :meth:`LayerCapture.start` and :meth:`LayerCapture.collect`, and
only for forward passes in grad mode (nothing is recorded under ``torch.no_grad()``), except
inside :meth:`LayerCapture.warm` (forward-only input statistics). A forward in grad mode whose
output is never back-propagated is simply not counted. A layer called twice inside one forward
of the root model (weight sharing) is a ``RuntimeError`` naming the module.

A model's layers are captured by one optimizer at a time: building a second capture over a layer
removes the hooks of the previous owner with a warning naming it (re-running a notebook cell
that builds a new optimizer just works); the previous owner then refuses to collect.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secant.distributed.sharding import full, local, local_rows
from secant.linalg.bfgs import all_finite


def _linear_rows(module: nn.Module, t: Tensor) -> Tensor:
    """``[..., d]`` (inputs or outputs of a linear map) as ``[N, T, d]``."""
    return t.reshape(t.shape[0], -1, t.shape[-1]) if t.dim() > 1 else t.view(1, 1, -1)


def _conv_inputs(module: nn.Module, x: Tensor) -> Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride)  # [N, C·kh·kw, L]
    return cols.transpose(1, 2)


def _conv_outputs(module: nn.Module, out: Tensor) -> Tensor:
    if out.dim() == 3:
        out = out.unsqueeze(0)
    return out.flatten(2).transpose(1, 2)


def _always(module: nn.Module) -> bool:
    return True


@dataclass(frozen=True)
class LayerKind:
    """How a module type is one Kronecker layer ``y = W x + b`` applied at ``T`` positions.

    Args:
        inputs: ``(module, x) ↦ [N, T, d_in]``, the rows ``x`` the weight multiplies, from the
            module's first forward argument.
        outputs: ``(module, t) ↦ [N, T, d_out]`` for the module's output or its gradient.
        transposed: the weight is stored ``[d_in, d_out]`` (``y = x W + b``, as Hugging Face
            transformers' ``Conv1D``) instead of ``[d_out, …]`` (trailing dims flattened).
        supported: which instances qualify (others go to the first-order fallback).

    The module must have ``weight`` and ``bias`` (``None`` allowed) attributes and compute
    ``W x + b`` from them and nothing else. Register with :func:`register_layer`.
    """

    inputs: Callable[[nn.Module, Tensor], Tensor]
    outputs: Callable[[nn.Module, Tensor], Tensor]
    transposed: bool = False
    supported: Callable[[nn.Module], bool] = _always


def _plain_conv(module: nn.Module) -> bool:
    return (module.groups == 1 and not isinstance(module.padding, str)
            and module.padding_mode == "zeros")


# by "module.QualName" of the class, so that a kind can be known without importing its library
_KINDS: dict[str, LayerKind] = {
    "torch.nn.modules.linear.Linear": LayerKind(_linear_rows, _linear_rows),
    "torch.nn.modules.conv.Conv2d": LayerKind(_conv_inputs, _conv_outputs,
                                              supported=_plain_conv),
    "transformers.pytorch_utils.Conv1D": LayerKind(_linear_rows, _linear_rows, transposed=True),
}


_KIND_OF: dict[type, LayerKind | None] = {}  # lookups by class, cleared on registration


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer(cls: type[nn.Module], kind: LayerKind) -> None:
    """Give the layer optimizers Kronecker curvature for ``cls`` (and its subclasses) as
    ``kind`` describes; see :class:`LayerKind`. Applies to optimizers built afterwards."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"cls={cls!r}: expected an nn.Module subclass")
    if not isinstance(kind, LayerKind):
        raise ValueError(f"kind={kind!r}: expected a secant.layers.LayerKind")
    _KINDS[_class_name(cls)] = kind
    _KIND_OF.clear()


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The registered kind of ``module``'s class or of its nearest registered base class."""
    cls = type(module)
    if cls not in _KIND_OF:
        _KIND_OF[cls] = next((_KINDS[n] for n in map(_class_name, cls.__mro__) if n in _KINDS),
                             None)
    return _KIND_OF[cls]


def is_supported(module: nn.Module) -> bool:
    """A registered layer kind (``nn.Linear``; ``nn.Conv2d`` with ``groups=1``, integer padding
    and zero padding mode; transformers' ``Conv1D``; :func:`register_layer`) with a trainable
    weight. Everything else goes to the optimizers' first-order fallback."""
    kind = layer_kind(module)
    return kind is not None and kind.supported(module) and module.weight.requires_grad


def layer_params(module: nn.Module) -> list[Tensor]:
    """``[weight]`` or ``[weight, bias]`` of a supported layer."""
    return [module.weight] if module.bias is None else [module.weight, module.bias]


def weight_matrix(module: nn.Module, t: Tensor) -> Tensor:
    """``t`` shaped as the layer's weight (the weight, its gradient) as ``[d_out, d_in]``: a
    view when ``t`` is contiguous (in-place updates of it then reach ``t``), else a copy; a 2-D
    ``t`` of a layer that stores its weight ``[d_out, d_in]`` is returned as it is."""
    if layer_kind(module).transposed:
        return t.t()
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def weight_layout(module: nn.Module, m: Tensor) -> Tensor:
    """A ``[d_out, d_in]`` matrix in the layout of the layer's weight (inverse of
    :func:`weight_matrix`), e.g. to add an update to it."""
    w = module.weight
    return m.t() if layer_kind(module).transposed else m.reshape(w.shape)


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in + 1)`` (``d_in`` without a bias) of a supported layer's ``W̃``."""
    shape = module.weight.shape
    d_out, d_in = shape[::-1] if layer_kind(module).transposed else (shape[0], shape[1:].numel())
    return d_out, d_in + (0 if module.bias is None else 1)


def grad_matrix(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """``∇W̃ = [∇W, ∇b]`` as a new ``[d_out, d_in+1]`` tensor (in ``dtype``, default the
    weight's); missing grads count as zero. FSDP2 (``DTensor``) gradients are gathered whole
    (a collective)."""
    w, b = module.weight, module.bias
    dtype = dtype or w.dtype
    gw = full(w.grad) if w.grad is not None else torch.zeros(w.shape, dtype=w.dtype,
                                                              device=w.device)
    gw = weight_matrix(module, gw).to(dtype)
    if b is None:
        return gw.clone(memory_format=torch.contiguous_format)
    gb = full(b.grad) if b.grad is not None else torch.zeros(b.shape, dtype=b.dtype,
                                                             device=b.device)
    return torch.cat((gw, gb.to(dtype).unsqueeze(1)), dim=1)


def param_matrix(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """``W̃ = [W, b]`` as a new ``[d_out, d_in+1]`` tensor (in ``dtype``, default the
    weight's); FSDP2 (``DTensor``) parameters are gathered whole (a collective)."""
    w, b = module.weight, module.bias
    dtype = dtype or w.dtype
    wm = weight_matrix(module, full(w.detach())).to(dtype)
    if b is None:
        return wm.clone(memory_format=torch.contiguous_format)
    return torch.cat((wm, full(b.detach()).to(dtype).unsqueeze(1)), dim=1)


def add_to_params(module: nn.Module, update: Tensor, alpha: float | Tensor) -> None:
    """``W̃ ← W̃ + α·update`` for ``update [d_out, d_in+1]`` (any float dtype: the sum is
    rounded to the parameters' dtype); an FSDP2 (``DTensor``) parameter takes the rows of its
    local shard. ``α`` a 0-d tensor (a compiled step's learning rate) multiplies first."""
    params = layer_params(module)
    if isinstance(alpha, Tensor):
        update, alpha = update * alpha, 1.0
    parts = [update] if len(params) == 1 else [update[:, :-1], update[:, -1]]
    with torch.no_grad():
        for p, part in zip(params, parts):
            if p.dim() > 1:
                part = weight_layout(module, part)
            local(p).add_(local_rows(p, part), alpha=alpha)


def homogeneous_inputs(module: nn.Module, x: Tensor, ones: bool = True) -> Tensor:
    """Layer inputs ``ā [N, T, d_in(+1)]`` (conv: patches by ``F.unfold``); 1 appended if
    biased (and ``ones``)."""
    a = layer_kind(module).inputs(module, x)
    if ones and module.bias is not None:
        a = torch.cat((a, a.new_ones(*a.shape[:-1], 1)), dim=-1)
    return a


def output_rows(module: nn.Module, out: Tensor) -> Tensor:
    """Pre-activation outputs (or their gradients) as ``[N, T, d_out]``."""
    return layer_kind(module).outputs(module, out)


def matrix_rows(module: nn.Module, t: Tensor, inputs: bool) -> Tensor:
    """The rows ``[N·T, d]`` of a layer's input (``inputs``: what the weight multiplies, conv
    patches; no 1 appended) or of its output / output gradient: :func:`homogeneous_inputs`
    (``ones=False``) or :func:`output_rows` with examples and positions flattened into one
    dimension. A 2-D tensor of a Linear-like kind is returned as it is (no view: the usual
    ``[N, d]`` case costs nothing)."""
    kind = layer_kind(module)
    rows = kind.inputs if inputs else kind.outputs
    if t.dim() == 2 and rows is _linear_rows:
        return t
    r = rows(module, t)
    return r.reshape(-1, r.shape[-1])


Reduce = Callable[[nn.Module, "LayerRecord"], list[Tensor]]

# the capture that currently owns each layer (one optimizer at a time; see the module docstring).
# Weak on both sides: a strong value would hold its own key (the capture holds its layers), so no
# model, optimizer or process group its hooks reach could ever be freed.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[LayerCapture]] = (
    weakref.WeakKeyDictionary())


def _owner(module: nn.Module) -> LayerCapture | None:
    ref = _OWNERS.get(module)
    return None if ref is None else ref()


class _WeakHook:
    """A module hook that calls ``capture.<method>(*args, *hook_args)`` through a weak reference.

    The model then holds no strong reference to its capture: model, optimizer and the process
    group they use are freed by reference counting as soon as the user drops them (a reference
    cycle would keep them, and the group's gloo threads, alive until a garbage collection, at
    worst into interpreter exit). A deep copy or pickle refers to the copied capture.
    """

    def __init__(self, capture: LayerCapture, method: str, *args: object) -> None:
        self._capture = weakref.ref(capture)
        self._method = method
        self._args = args

    def __call__(self, *hook_args: object) -> object:
        capture = self._capture()
        if capture is None:  # the optimizer is gone: nothing to record
            return None
        return getattr(capture, self._method)(*self._args, *hook_args)

    def __reduce__(self) -> tuple:
        capture = self._capture()
        return (_dead_hook, ()) if capture is None else (
            _WeakHook, (capture, self._method, *self._args))


def _ignore(*hook_args: object) -> None:
    return None


def _dead_hook() -> Callable[..., None]:
    return _ignore


@dataclass
class LayerRecord:
    """What one call of one layer left (see the module docstring)."""

    x: Tensor | None = None
    h_mean: Tensor | None = None
    g: Tensor | None = None
    out: Tensor | None = None  # graph-attached output, only for sampled-Fisher passes


@dataclass
class _Sums:
    """A layer's statistics of the calls so far; ``calls`` counts completed calls. After one
    call, that call's statistics as they are (``finite`` is ``None``); from the second call on,
    the sums of the statistics of the calls whose statistics were all finite, and ``finite``
    (a tensor, no host sync) the number of those calls."""

    stats: list[Tensor] = field(default_factory=list)
    finite: Tensor | None = None
    calls: int = 0


def _finite_part(stats: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """``(stats, 1)`` if every statistic is finite, else ``(zeros, 0)`` (one flag for the set,
    in the statistics' dtype)."""
    ok = all_finite(*stats)
    bad = ~ok
    return [t.masked_fill(bad, 0.0) for t in stats], ok.to(stats[0].dtype)


class LayerCapture:
    """Forward hooks (and tensor hooks on outputs) on the given named layers of ``model``.

    Args:
        model: the root module (its forward delimits weight sharing; sampled-Fisher hook).
        layers: ``{qualified name: module}`` of supported layers.
        dtype: dtype of the records (default: each input's own).
        grad_scale: returns the current loss scale (a tensor or ``None``) that the captured
            pre-activation gradients are divided by.
        owner: name of the optimizer, for the messages.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], *,
                 dtype: torch.dtype | None = None,
                 grad_scale: Callable[[], Tensor | None] | None = None,
                 owner: str = "optimizer") -> None:
        self.model = model
        self.dtype = dtype
        self.grad_scale = grad_scale
        self.owner = owner
        self.attached = True
        self.sums: dict[str, _Sums] = {}
        self.active = False
        self.warming = False
        self.need_inputs = True
        self.need_h_mean = False
        self.need_grads = True
        self.fisher_loss: Callable[[Tensor], Tensor] | None = None
        self.carry = False
        self.reduce: Reduce | None = None
        self.last_calls: dict[str, int] = {}  # completed calls per layer at the last collect
        self._calls: dict[str, int] = {}  # calls per layer in the current root forward
        self._pending_out: list[tuple[str, LayerRecord]] = []
        self._handles: list = []
        self.layers: dict[str, nn.Module] = {}
        self.add_layers(layers)  # layer hooks first: the root may itself be a layer
        self._handles += [model.register_forward_pre_hook(_WeakHook(self, "_model_pre_hook")),
                          model.register_forward_hook(_WeakHook(self, "_model_hook"))]

    def __setstate__(self, state: dict) -> None:
        """A copied or unpickled capture owns the copied layers its hooks are on."""
        self.__dict__.update(state)
        if self.attached:
            for m in self.layers.values():
                _OWNERS[m] = weakref.ref(self)

    def add_layers(self, layers: dict[str, nn.Module]) -> None:
        """Register more layers (fresh hooks; they take part from the next :meth:`start`)."""
        for name, m in layers.items():
            if not is_supported(m):
                raise ValueError(f"layer {name!r} ({type(m).__name__}) is not supported")
        self.layers.update(layers)
        if self.active:
            self.sums.update({n: _Sums() for n in layers})
        self._take_over(layers)
        self._handles.extend(m.register_forward_hook(_WeakHook(self, "_layer_hook", n))
                             for n, m in layers.items())

    def _take_over(self, layers: dict[str, nn.Module]) -> None:
        previous = []
        for m in layers.values():
            old = _owner(m)
            if old is not None and old is not self and old.attached and old not in previous:
                previous.append(old)
            _OWNERS[m] = weakref.ref(self)
        for old in previous:
            old.remove()
            warnings.warn(
                f"{self.owner}: the layers of this model were captured by an earlier "
                f"{old.owner}; its hooks were removed so that the new optimizer works (the "
                f"earlier one can no longer step). Call remove_hooks() on an optimizer you "
                f"replace to avoid this warning.", stacklevel=4)

    # ------------------------------------------------------------------ control
    def start(self, reduce: Reduce, *, inputs: bool = True, h_mean: bool = False,
              grads: bool = True, fisher_loss: Callable[[Tensor], Tensor] | None = None,
              carry: bool = False) -> None:
        """Clear the sums and capture the following calls (in grad mode): each completed call
        is turned into statistics by ``reduce(module, record)``. With ``carry`` a layer output
        that does not require grad (in grad mode: nothing upstream is trainable) is replaced by
        a copy of a detached leaf that does, so that backward still reaches the layer's
        pre-activations (a copy, not the leaf, so in-place ops downstream stay legal)."""
        if not self.attached:
            raise RuntimeError(
                f"the capture hooks of this {self.owner} were removed (remove_hooks(), or a "
                f"newer optimizer over the same layers took them over); build a new optimizer")
        self.sums = {n: _Sums() for n in self.layers}
        self.need_inputs, self.need_h_mean, self.need_grads = inputs, h_mean, grads
        self.fisher_loss = fisher_loss
        self.carry = carry
        self.reduce = reduce
        self._calls = {}
        self._pending_out = []
        self.active = True

    def stop(self) -> None:
        self.active = False
        self.sums = {}
        self._calls = {}
        self._pending_out = []

    def collect(self) -> dict[str, list[Tensor] | None]:
        """Stop capturing; per layer the mean over its completed calls of the ``reduce``
        statistics (a single call's statistics as ``reduce`` returned them, untested; with
        several calls, the mean over the finite ones), or ``None`` if no call of the layer
        completed (``last_calls`` holds the number of completed calls per layer)."""
        sums = self.sums
        self.last_calls = {n: s.calls for n, s in sums.items()}
        wanted = self.active
        self.stop()
        if not wanted:
            if not self.attached:
                self.start(lambda m, r: [])  # raises the detached-capture error
            raise RuntimeError("layer capture was not started")
        out: dict[str, list[Tensor] | None] = {}
        for name, s in sums.items():
            if s.calls == 0:
                out[name] = None
            else:
                out[name] = s.stats if s.finite is None else [t / s.finite for t in s.stats]
        return out

    @contextmanager
    def warm(self) -> Iterator[None]:
        """Inside this context, started captures record layer inputs of every forward pass,
        also under ``torch.no_grad()`` (forward-only input statistics, e.g. a K-BFGS warm start)."""
        self.warming = True
        try:
            yield
        finally:
            self.warming = False
            self.stop()

    def remove(self) -> None:
        """Remove every hook this capture registered."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.attached = False
        for m in self.layers.values():
            if _owner(m) is self:
                del _OWNERS[m]
        self.stop()

    # ------------------------------------------------------------------ hooks
    def _capturing(self, out: Tensor) -> bool:
        if not self.active:
            return False
        if self.warming:
            return True
        return torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad

    def _cast(self, t: Tensor) -> Tensor:
        """``t`` out of the autograd graph, in the capture's dtype: no op at all where it is
        in neither (a gradient, or an input that needs none, in the capture's dtype)."""
        if t.requires_grad:
            t = t.detach()
        return t if self.dtype is None or t.dtype == self.dtype else t.to(self.dtype)

    def _add(self, name: str, rec: LayerRecord) -> None:
        """Reduce one completed call and add its statistics to the layer's (see :class:`_Sums`:
        the first call is kept as it is; a second one starts the sums over finite calls)."""
        module = self.layers[name]
        dev = module.weight.device.type
        if torch.is_autocast_enabled(dev):  # statistics in the capture's dtype, not autocast's
            with torch.autocast(dev, enabled=False):
                stats = self.reduce(module, rec)
        else:
            stats = self.reduce(module, rec)
        s = self.sums[name]
        if s.calls == 0:
            s.stats = stats
        else:
            if s.finite is None:
                s.stats, s.finite = _finite_part(s.stats)
            stats, ok = _finite_part(stats)
            torch._foreach_add_(s.stats, stats)
            s.finite = s.finite + ok
        s.calls += 1

    def _layer_hook(self, name: str, mod: nn.Module, inputs: tuple, out: Tensor
                    ) -> Tensor | None:
        """Forward hook of layer ``name`` (registered through :class:`_WeakHook`); returns the
        output's replacement under ``carry`` (see :meth:`start`)."""
        module = self.layers[name]
        if (self.carry and self.active and isinstance(out, Tensor) and not out.requires_grad
                and torch.is_grad_enabled()):
            out = out.detach().requires_grad_().clone()
            self._record(name, module, inputs, out)
            return out
        if self._capturing(out):
            self._record(name, module, inputs, out)
        return None

    def _record(self, name: str, module: nn.Module, inputs: tuple, out: Tensor) -> None:
        """Record a call of layer ``name`` whose output ``out`` is captured."""
        if self._calls.get(name, 0) >= 1 and not self.warming:
            raise RuntimeError(
                f"layer {name!r} ({type(module).__name__}) was called more than once in one "
                f"forward pass of the model; weight sharing / repeated calls are not "
                f"supported by Kronecker-factored optimizers (exclude it with `exclude=`)")
        self._calls[name] = self._calls.get(name, 0) + 1
        rec = LayerRecord()
        if self.need_inputs or self.warming:
            rec.x = self._cast(inputs[0])
        if self.need_h_mean and not self.warming:
            rec.h_mean = matrix_rows(module, self._cast(out), inputs=False).mean(0)
        if self.warming or not self.need_grads:
            self._calls[name] -= 1
            self._add(name, rec)
            return
        if self.fisher_loss is not None:
            rec.out = out
            self._pending_out.append((name, rec))
            return
        out.register_hook(self._make_grad_hook(name, rec))

    def _make_grad_hook(self, name: str, rec: LayerRecord) -> Callable:
        module = self.layers[name]
        sums = self.sums

        def grad_hook(grad: Tensor) -> None:
            if not self.active or self.sums is not sums:
                return  # a call started before the last start()/collect(): stale
            g = output_rows(module, self._cast(grad))
            scale = self.grad_scale() if self.grad_scale is not None else None
            rec.g = g if scale is None else g / scale.to(g.dtype)
            self._calls[name] = max(0, self._calls.get(name, 0) - 1)
            self._add(name, rec)

        return grad_hook

    def _model_pre_hook(self, mod: nn.Module, inputs: tuple) -> None:
        self._calls = {}

    def _model_hook(self, mod: nn.Module, inputs: tuple, out: Tensor) -> None:
        if self.fisher_loss is None or not self.active or self.warming:
            return
        if not torch.is_grad_enabled():
            return
        if not isinstance(out, Tensor):
            raise RuntimeError("sampled-Fisher capture needs a model whose forward returns a "
                               f"single Tensor, got {type(out).__name__}")
        pending, self._pending_out = self._pending_out, []
        if not pending:
            return
        loss = self.fisher_loss(out)
        grads = torch.autograd.grad(loss, [r.out for _, r in pending], retain_graph=True,
                                    allow_unused=True)
        for (n, rec), gr in zip(pending, grads):
            rec.out = None
            if gr is not None:
                rec.g = output_rows(self.layers[n], self._cast(gr))
                self._add(n, rec)
