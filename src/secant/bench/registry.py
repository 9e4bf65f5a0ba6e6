"""The one list of optimizers the harness knows. An entry is *available* only when its class
exists at run time (``torch.optim`` for the baselines, ``getattr(secant, name)`` for secant's
own), so entries light up as optimizers land, with no other edit.

Every entry is built by a factory ``(model, lr) -> optimizer`` with its other hyperparameters
fixed here; the learning rate comes from the committed tuning table
(:mod:`secant.bench.tuned`, written by ``secant tune``), else from ``default_lr`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import secant
from secant.bench.data import BenchError
from secant.bench.tuned import TUNED


def _secant_class(name: str) -> Callable[..., torch.optim.Optimizer] | None:
    return getattr(secant, name, None)


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    description: str
    shape: str  # "param" (built from model.parameters()) or "layer" (built from the model)
    resolve: Callable[[], Callable[..., torch.optim.Optimizer] | None]
    hyper: dict  # fixed hyperparameters besides lr
    default_lr: float  # used when the tuning table has no entry for the problem
    grid: tuple[float, ...]  # learning rates tried by ``secant tune``

    @property
    def available(self) -> bool:
        return self.resolve() is not None

    def make(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        cls = self.resolve()
        if cls is None:
            raise BenchError(f"optimizer {self.name!r} is not available in this secant version")
        target = model if self.shape == "layer" else model.parameters()
        return cls(target, lr=lr, **self.hyper)

    def lr_for(self, problem: str) -> float:
        return float(TUNED.get("lrs", {}).get(problem, {}).get(self.name, self.default_lr))

    def lr_source(self, problem: str) -> str:
        if self.name in TUNED.get("lrs", {}).get(problem, {}):
            return "tuned"
        return "default"


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def _add(entry: OptimizerEntry) -> None:
    OPTIMIZERS[entry.name] = entry


_add(OptimizerEntry(
    "sgd", "torch.optim.SGD with heavy-ball momentum 0.9", "param",
    lambda: torch.optim.SGD, {"momentum": 0.9}, 1e-3, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)))
_add(OptimizerEntry(
    "adam", "torch.optim.Adam (betas 0.9, 0.999; eps 1e-8)", "param",
    lambda: torch.optim.Adam, {}, 1e-3, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)))
_add(OptimizerEntry(
    "mlbfgs", "secant.MomentumLBFGS: momentum-averaged block-wise L-BFGS (Niu et al. 2023); "
    "beta 0.9, update_period 20, history 10, momentum 0.9", "param",
    lambda: _secant_class("MomentumLBFGS"),
    {"momentum": 0.9, "beta": 0.9, "update_period": 20, "history_size": 10}, 1e-3,
    (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)))
_add(OptimizerEntry(
    "kfac", "secant.KFAC: Kronecker-factored natural gradient (Martens & Grosse 2015); "
    "damping 0.03, Cholesky inverses of the damped factors", "layer",
    lambda: _secant_class("KFAC"), {"damping": 0.03, "inverse_method": "cholesky"}, 1e-2,
    (1e-3, 3e-3, 1e-2, 3e-2, 0.1)))
_add(OptimizerEntry(
    "kbfgs", "secant.KBFGS: Kronecker-factored BFGS with double damping (Goldfarb et al. "
    "2020); damping 0.3 (paper MNIST demo)", "layer",
    lambda: _secant_class("KBFGS"), {"damping": 0.3}, 0.3, (0.03, 0.1, 0.3, 1.0, 3.0)))
_add(OptimizerEntry(
    "kbfgsl", "secant.KBFGSL: K-BFGS with limited-memory (L-BFGS) G factors (Goldfarb et al. "
    "2020); damping 0.3", "layer",
    lambda: _secant_class("KBFGSL"), {"damping": 0.3}, 0.3, (0.03, 0.1, 0.3, 1.0, 3.0)))
_add(OptimizerEntry(
    "neumann", "secant.Neumann: Neumann-series implicit inverse Hessian (Krishnan et al. "
    "2018); library defaults besides lr", "param",
    lambda: _secant_class("Neumann"), {}, 1e-3, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)))


def get_optimizer(name: str) -> OptimizerEntry:
    if name not in OPTIMIZERS:
        raise BenchError(f"unknown optimizer {name!r}; expected one of: {', '.join(OPTIMIZERS)}")
    entry = OPTIMIZERS[name]
    if not entry.available:
        avail = ", ".join(available_optimizers())
        raise BenchError(f"optimizer {name!r} is not available in this secant version "
                         f"(its class is missing); available: {avail}")
    return entry


def available_optimizers() -> list[str]:
    return [name for name, e in OPTIMIZERS.items() if e.available]
