"""Baselines that ``torch.optim`` does not ship as one class: SGD on the globally normalised
gradient (the mL-BFGS authors' baseline) and Muon for matrices with AdamW for the rest (as the
``torch.optim.Muon`` documentation recommends). See ``docs/bench.md`` (Baselines)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


class NormalisedSGD(torch.optim.SGD):
    """SGD with heavy-ball momentum on ``g / ‖g‖``, ``‖g‖`` the global 2-norm over every
    parameter's gradient (plus ``eps``). Separates the effect of normalising the step from
    that of curvature. Use exactly like :class:`torch.optim.SGD`."""

    def __init__(self, params, lr: float, momentum: float = 0.9, eps: float = 1e-12,
                 **kwargs) -> None:
        if not eps > 0:
            raise ValueError(f"eps={eps}: expected a value > 0")
        self.eps = eps
        super().__init__(params, lr=lr, momentum=momentum, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, 1.0 / (norm + self.eps))  # tensor op: no host sync
        super().step()
        return loss


class Combined:
    """Several optimizers over disjoint parameter sets stepped as one: ``step(closure)``
    evaluates the closure once, then steps each optimizer. ``state_dict()['state']`` holds
    every part's state (for the harness's state-size measure)."""

    def __init__(self, parts: Iterable[torch.optim.Optimizer]) -> None:
        self.parts = [p for p in parts if p.param_groups]
        self.param_groups = [g for p in self.parts for g in p.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parts:
            p.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self.parts:
            p.step()
        return loss

    def state_dict(self) -> dict:
        return {"state": {i: p.state_dict()["state"] for i, p in enumerate(self.parts)}}


def muon_with_adamw(model: nn.Module, lr: float, weight_decay: float) -> Combined:
    """``torch.optim.Muon`` on the 2-D weights of hidden layers; ``torch.optim.AdamW`` on
    everything else (biases, norms, convolution kernels, embeddings, the output layer). Muon's
    ``adjust_lr_fn="match_rms_adamw"`` scales its update to AdamW's RMS, so one ``lr`` serves
    both, as does ``weight_decay``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1].weight if linears else None
    matrices = [p for p in model.parameters() if p.ndim == 2 and p is not head]
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in ids]
    parts = []
    if matrices:
        parts.append(torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay,
                                      adjust_lr_fn="match_rms_adamw"))
    if rest:
        parts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay))
    return Combined(parts)
