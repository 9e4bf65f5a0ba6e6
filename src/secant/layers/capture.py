"""Hooks that capture what Kronecker-factored optimizers need from ``nn.Linear`` / ``nn.Conv2d``.

For a supported layer the weight is viewed as one matrix ``W̃ = [W, b] ∈ R^{d_out × (d_in+1)}``
(bias as the last column — the homogeneous coordinate; no extra column when the layer has no
bias). Conv2d weights ``[d_out, C, kh, kw]`` flatten to ``d_in = C·kh·kw``, matching
``F.unfold``'s patch order, so a convolution is the matrix product of ``W̃`` with the unfolded
patches of its input (Grosse & Martens 2016).

Per forward/backward the capture records, for every registered layer:

* ``x`` — the layer input (detached); :func:`homogeneous_inputs` turns it into ``ā [N, T, d_in+1]``
  (``T = 1`` for a Linear layer on ``[N, d]`` inputs, ``T`` = spatial positions for conv, extra
  leading dimensions of a Linear input also count as positions);
* ``h_mean`` — the batch-and-position mean of the pre-activation output, ``[d_out]`` (only when
  asked for: K-BFGS);
* ``g`` — the gradient of the loss w.r.t. the pre-activation output, reshaped ``[N, T, d_out]``.

Capturing is only on between :meth:`LayerCapture.start` and :meth:`LayerCapture.collect`, and
only for forward passes in grad mode (nothing is recorded under ``torch.no_grad()``), except
inside :meth:`LayerCapture.warm` (forward-only input statistics). A registered layer that got no
data, or that is called twice before the records are collected, is a ``RuntimeError`` naming the
module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_supported(module: nn.Module) -> bool:
    """``nn.Linear``, or ``nn.Conv2d`` with ``groups=1``, integer padding and zero padding mode,
    with a trainable weight. Everything else goes to the optimizers' first-order fallback."""
    if isinstance(module, nn.Linear):
        return module.weight.requires_grad
    if isinstance(module, nn.Conv2d):
        return (module.groups == 1 and not isinstance(module.padding, str)
                and module.padding_mode == "zeros" and module.weight.requires_grad)
    return False


def layer_params(module: nn.Module) -> list[Tensor]:
    """``[weight]`` or ``[weight, bias]`` of a supported layer."""
    return [module.weight] if module.bias is None else [module.weight, module.bias]


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in + 1)`` (``d_in`` without a bias) of a supported layer's ``W̃``."""
    w = module.weight
    d_in = w[0].numel() + (0 if module.bias is None else 1)
    return w.shape[0], d_in


def grad_matrix(module: nn.Module) -> Tensor:
    """``∇W̃ = [∇W, ∇b]`` as ``[d_out, d_in+1]``; missing grads count as zero."""
    w, b = module.weight, module.bias
    gw = w.grad if w.grad is not None else torch.zeros_like(w)
    gw = gw.reshape(w.shape[0], -1)
    if b is None:
        return gw.clone()
    gb = b.grad if b.grad is not None else torch.zeros_like(b)
    return torch.cat((gw, gb.unsqueeze(1)), dim=1)


def param_matrix(module: nn.Module) -> Tensor:
    """``W̃ = [W, b]`` as a new ``[d_out, d_in+1]`` tensor."""
    w, b = module.weight, module.bias
    wm = w.detach().reshape(w.shape[0], -1)
    if b is None:
        return wm.clone()
    return torch.cat((wm, b.detach().unsqueeze(1)), dim=1)


def add_to_params(module: nn.Module, update: Tensor, alpha: float) -> None:
    """``W̃ ← W̃ + α·update`` for ``update [d_out, d_in+1]``."""
    w, b = module.weight, module.bias
    with torch.no_grad():
        if b is None:
            w.add_(update.view_as(w), alpha=alpha)
        else:
            w.add_(update[:, :-1].reshape(w.shape), alpha=alpha)
            b.add_(update[:, -1], alpha=alpha)


def homogeneous_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """Layer inputs ``ā [N, T, d_in(+1)]``: conv patches by ``F.unfold``; 1 appended if biased."""
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation,
                        padding=module.padding, stride=module.stride)  # [N, C·kh·kw, L]
        a = cols.transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.view(1, 1, -1)
    if module.bias is not None:
        a = torch.cat((a, a.new_ones(*a.shape[:-1], 1)), dim=-1)
    return a


def output_rows(module: nn.Module, out: Tensor) -> Tensor:
    """Pre-activation outputs (or their gradients) as ``[N, T, d_out]``."""
    if isinstance(module, nn.Conv2d):
        if out.dim() == 3:
            out = out.unsqueeze(0)
        return out.flatten(2).transpose(1, 2)
    return out.reshape(out.shape[0], -1, out.shape[-1]) if out.dim() > 1 else out.view(1, 1, -1)


@dataclass
class LayerRecord:
    """What one forward/backward left for one layer (see the module docstring)."""

    x: Tensor | None = None
    h_mean: Tensor | None = None
    g: Tensor | None = None
    out: Tensor | None = None  # graph-attached output, only for sampled-Fisher passes


class LayerCapture:
    """Forward hooks (and tensor hooks on outputs) on the given named layers of ``model``.

    Args:
        model: the root module (used for the sampled-Fisher hook on the model output).
        layers: ``{qualified name: module}`` of supported layers.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        for name, m in layers.items():
            if not is_supported(m):
                raise ValueError(f"layer {name!r} ({type(m).__name__}) is not supported")
        self.model = model
        self.layers = dict(layers)
        self.records: dict[str, LayerRecord] = {}
        self.active = False
        self.warming = False
        self.need_inputs = True
        self.need_h_mean = False
        self.need_grads = True
        self.fisher_loss: Callable[[Tensor], Tensor] | None = None
        self._handles = [m.register_forward_hook(self._make_hook(n))
                         for n, m in self.layers.items()]
        self._handles.append(model.register_forward_hook(self._model_hook))

    # ------------------------------------------------------------------ control
    def start(self, *, inputs: bool = True, h_mean: bool = False, grads: bool = True,
              fisher_loss: Callable[[Tensor], Tensor] | None = None) -> None:
        """Clear records and capture the next forward/backward (in grad mode)."""
        self.records = {n: LayerRecord() for n in self.layers}
        self.need_inputs, self.need_h_mean, self.need_grads = inputs, h_mean, grads
        self.fisher_loss = fisher_loss
        self.active = True

    def stop(self) -> None:
        self.active = False
        self.records = {}

    def collect(self) -> dict[str, LayerRecord]:
        """Stop capturing and return the records; a layer without its data is an error."""
        recs = self.records
        wanted = self.active
        self.stop()
        if not wanted:
            raise RuntimeError("layer capture was not started")
        for name, rec in recs.items():
            missing = []
            if self.need_inputs and rec.x is None:
                missing.append("inputs (no forward pass in grad mode reached it)")
            if self.need_h_mean and rec.h_mean is None:
                missing.append("outputs (no forward pass in grad mode reached it)")
            if self.need_grads and rec.g is None:
                missing.append("pre-activation gradients (its output did not reach the loss's "
                               "backward)")
            if missing:
                kind = type(self.layers[name]).__name__
                raise RuntimeError(
                    f"registered layer {name!r} ({kind}) received no data in this step: missing "
                    f"{' and '.join(missing)}. Every registered layer must take part in each "
                    f"step's forward and backward; exclude unused layers with `exclude=`.")
        return recs

    @contextmanager
    def warm(self) -> Iterator[None]:
        """Inside this context, started captures record layer inputs of every forward pass,
        also under ``torch.no_grad()`` (forward-only statistics, e.g. a K-BFGS warm start)."""
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
        self.stop()

    # ------------------------------------------------------------------ hooks
    def _capturing(self, out: Tensor) -> bool:
        if not self.active:
            return False
        if self.warming:
            return True
        return torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad

    def _make_hook(self, name: str) -> Callable:
        module = self.layers[name]

        def hook(mod: nn.Module, inputs: tuple, out: Tensor) -> None:
            if not self._capturing(out):
                return
            rec = self.records[name]
            if rec.x is not None or rec.h_mean is not None or rec.out is not None:
                raise RuntimeError(
                    f"layer {name!r} ({type(module).__name__}) was called more than once in one "
                    f"captured forward pass; weight sharing / repeated calls are not supported "
                    f"by Kronecker-factored optimizers (exclude it with `exclude=`), and "
                    f"evaluation between steps must run under torch.no_grad()")
            if self.need_inputs or self.warming:
                rec.x = inputs[0].detach()
            if self.need_h_mean and not self.warming:
                rows = output_rows(module, out.detach())
                rec.h_mean = rows.mean(dim=(0, 1))
            if self.warming or not self.need_grads:
                return
            if self.fisher_loss is not None:
                rec.out = out
                return
            out.register_hook(self._make_grad_hook(name))

        return hook

    def _make_grad_hook(self, name: str) -> Callable:
        module = self.layers[name]

        def grad_hook(grad: Tensor) -> None:
            if not self.active or name not in self.records:
                return
            rec = self.records[name]
            if rec.g is not None:
                raise RuntimeError(
                    f"layer {name!r} ({type(module).__name__}) received pre-activation gradients "
                    f"twice in one captured step (two backward passes through one forward?)")
            rec.g = output_rows(module, grad.detach())

        return grad_hook

    def _model_hook(self, mod: nn.Module, inputs: tuple, out: Tensor) -> None:
        if self.fisher_loss is None or not self.active or self.warming:
            return
        if not torch.is_grad_enabled():
            return
        if not isinstance(out, Tensor):
            raise RuntimeError("sampled-Fisher capture needs a model whose forward returns a "
                               f"single Tensor, got {type(out).__name__}")
        names = [n for n, r in self.records.items() if r.out is not None]
        if not names:
            return
        outs = [self.records[n].out for n in names]
        loss = self.fisher_loss(out)
        grads = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
        for n, gr in zip(names, grads):
            rec = self.records[n]
            rec.out = None
            if gr is not None:
                rec.g = output_rows(self.layers[n], gr.detach())
