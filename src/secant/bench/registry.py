"""The one list of optimizers the harness knows: the baselines users would pick instead and
secant's own methods. An entry is *available* only when what it builds exists at run time
(``torch.optim``, the optional ``pytorch_optimizer`` package of the ``baselines`` extra, or
``getattr(secant, name)``), so entries light up as packages are installed, with no other edit.

Every entry builds ``(model, lr, knob) -> optimizer``: the learning rate and, where the method
has one, its main second hyperparameter (the *knob*: damping, β, weight decay), both searched on
log grids by ``secant tune`` (``docs/bench.md``, Tuning) and read back from a tuning table
(:mod:`secant.bench.tuned_table`); an entry's ``default_lr`` and knob default serve where the
table has no choice. Other hyperparameters are fixed here and stated in the description.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import secant
from secant.bench import baselines
from secant.bench.data import BenchError


@dataclass(frozen=True)
class Knob:
    """A second hyperparameter searched on a log grid. With ``complement`` the grid is over
    ``1 − value`` (for averaging factors such as β: 0.9, 0.99, 0.999 are equally spaced).
    ``bounds`` limits grid extension, in the searched coordinate (for β: 1 − β)."""

    name: str
    default: float
    grid: tuple[float, ...]  # values of the knob itself, increasing
    complement: bool = False
    bounds: tuple[float, float] = (0.0, float("inf"))

    def to_search(self, value: float) -> float:
        return float(f"{1.0 - value:.12g}") if self.complement else value

    def from_search(self, u: float) -> float:
        return float(f"{1.0 - u:.12g}") if self.complement else u


Factory = Callable[[nn.Module, float, dict], object]


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    description: str
    family: str  # "baseline" or "secant"
    resolve: Callable[[], Factory | None]  # None: not available here
    default_lr: float
    lr_grid: tuple[float, ...]
    knob: Knob | None = None
    needs_layers: bool = False  # hooks Linear/Conv2d layers (K-FAC, K-BFGS)
    warm_start: bool = False  # K-BFGS: A from one pass over the training data before training

    @property
    def available(self) -> bool:
        return self.resolve() is not None

    def make(self, model: nn.Module, lr: float, knob: dict | None = None):
        factory = self.resolve()
        if factory is None:
            raise BenchError(f"optimizer {self.name!r} is not available here "
                             f"({self.description})")
        return factory(model, lr, dict(knob or {}))

    def applies_to(self, problem) -> bool:
        """Whether the entry can train ``problem`` (a layer optimizer needs Linear/Conv2d
        layers)."""
        return not self.needs_layers or problem.layer_optimizers


def _secant(name: str, layer: bool = False, **fixed) -> Callable[[], Factory | None]:
    def resolve() -> Factory | None:
        cls = getattr(secant, name, None)
        if cls is None:
            return None
        return lambda model, lr, knob: cls(model if layer else model.parameters(), lr=lr,
                                           **fixed, **knob)
    return resolve


def _torch(cls: Callable, **fixed) -> Callable[[], Factory]:
    return lambda: (lambda model, lr, knob: cls(model.parameters(), lr=lr, **fixed, **knob))


def _optional(module: str, attr: str, **fixed) -> Callable[[], Factory | None]:
    def resolve() -> Factory | None:
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return None
        return lambda model, lr, knob: cls(model.parameters(), lr=lr, **fixed, **knob)
    return resolve


OPTIMIZERS: dict[str, OptimizerEntry] = {}
_LR = (1e-3, 3e-3, 1e-2, 3e-2, 0.1)
_LR_ADAPTIVE = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
_DAMPING = (0.01, 0.03, 0.1, 0.3, 1.0)
_WD = (1e-4, 1e-3, 1e-2, 0.1)
# bounded: on the quadratic (optimum at θ = 0) unbounded decay "wins" by shrinking θ to 0
_WD_KNOB = Knob("weight_decay", 1e-2, _WD, bounds=(1e-6, 0.3))


def _add(entry: OptimizerEntry) -> None:
    OPTIMIZERS[entry.name] = entry


# ---- baselines
_add(OptimizerEntry("sgd", "torch.optim.SGD, heavy-ball momentum 0.9", "baseline",
                    _torch(torch.optim.SGD, momentum=0.9), 1e-2, _LR))
_add(OptimizerEntry("sgd-norm", "SGD (momentum 0.9) on the gradient divided by its global "
                    "norm: the mL-BFGS authors' baseline", "baseline",
                    lambda: (lambda model, lr, knob: baselines.NormalisedSGD(
                        model.parameters(), lr=lr, momentum=0.9, **knob)), 1e-2, _LR))
_add(OptimizerEntry("adam", "torch.optim.Adam (betas 0.9, 0.999; eps 1e-8)", "baseline",
                    _torch(torch.optim.Adam), 1e-3, _LR_ADAPTIVE))
_add(OptimizerEntry("adamw", "torch.optim.AdamW (betas 0.9, 0.999); weight decay tuned",
                    "baseline", _torch(torch.optim.AdamW), 1e-3, _LR_ADAPTIVE,
                    _WD_KNOB))
_add(OptimizerEntry("muon", "torch.optim.Muon (momentum 0.95, Nesterov, RMS matched to "
                    "AdamW) on hidden 2-D weights, torch.optim.AdamW on the rest; weight "
                    "decay tuned", "baseline",
                    lambda: None if not hasattr(torch.optim, "Muon") else (
                        lambda model, lr, knob: baselines.muon_with_adamw(model, lr, **knob)),
                    1e-3, _LR_ADAPTIVE, _WD_KNOB))
_add(OptimizerEntry("soap", "pytorch_optimizer.SOAP (Shampoo-family; betas 0.95, 0.95, "
                    "preconditioner every 10 steps), from the optional 'baselines' extra",
                    "baseline", _optional("pytorch_optimizer", "SOAP"), 3e-3, _LR_ADAPTIVE,
                    _WD_KNOB))
# ---- secant
_add(OptimizerEntry("mlbfgs", "secant.MomentumLBFGS: momentum-averaged block-wise L-BFGS (Niu "
                    "et al. 2023); library defaults besides lr and β (the EMA factor, tuned)",
                    "secant", _secant("MomentumLBFGS"), 3e-2, _LR,
                    Knob("beta", 0.999, (0.9, 0.99, 0.999), complement=True,
                         bounds=(1e-4, 0.3))))
_add(OptimizerEntry("kfac", "secant.KFAC: Kronecker-factored natural gradient (Martens & "
                    "Grosse 2015), Cholesky inverses; damping tuned", "secant",
                    _secant("KFAC", layer=True, inverse_method="cholesky"), 1e-2, _LR_ADAPTIVE,
                    Knob("damping", 0.03, _DAMPING), needs_layers=True))
_add(OptimizerEntry("kbfgs", "secant.KBFGS: Kronecker-factored BFGS with double damping "
                    "(Goldfarb et al. 2020), A warm-started from one pass over the training "
                    "data; damping tuned", "secant", _secant("KBFGS", layer=True), 0.3,
                    (0.03, 0.1, 0.3, 1.0, 3.0), Knob("damping", 0.3, _DAMPING),
                    needs_layers=True, warm_start=True))
_add(OptimizerEntry("kbfgsl", "secant.KBFGSL: K-BFGS with limited-memory G factors, "
                    "A warm-started; damping tuned", "secant", _secant("KBFGSL", layer=True), 0.3,
                    (0.03, 0.1, 0.3, 1.0, 3.0), Knob("damping", 0.3, _DAMPING),
                    needs_layers=True, warm_start=True))
_add(OptimizerEntry("neumann", "secant.Neumann: Neumann-series implicit inverse Hessian "
                    "(Krishnan et al. 2018); library defaults besides lr", "secant",
                    _secant("Neumann"), 1e-2, _LR))


def register_variant(base: str, name: str, problem: str, **options: Any) -> str:
    """Register ``name``: ``base``'s optimizer with the constructor ``options`` added, whose
    defaults are ``base``'s tuned learning rate and knob on ``problem`` (so it runs at the
    settings chosen for ``base``), in this process and the workers it forks. Returns ``name``."""
    from secant.bench import tuned_table

    entry = get_optimizer(base)
    lr, knob, _ = tuned_table.package().settings(entry, problem)
    factory = entry.resolve()
    extra = ", ".join(f"{k}={v!r}" for k, v in options.items())
    OPTIMIZERS[name] = dataclasses.replace(
        entry, name=name, description=f"{entry.description}; {extra}",
        resolve=lambda: (lambda model, lr, k: factory(model, lr, {**k, **options})),
        default_lr=lr,
        knob=entry.knob and dataclasses.replace(entry.knob, default=knob[entry.knob.name]))
    return name


def get_optimizer(name: str) -> OptimizerEntry:
    if name not in OPTIMIZERS:
        raise BenchError(f"unknown optimizer {name!r}; expected one of: {', '.join(OPTIMIZERS)}")
    entry = OPTIMIZERS[name]
    if not entry.available:
        avail = ", ".join(available_optimizers())
        hint = " (pip install 'secant[baselines]')" if entry.family == "baseline" else ""
        raise BenchError(f"optimizer {name!r} is not available here{hint}; available: {avail}")
    return entry


def available_optimizers() -> list[str]:
    return [name for name, e in OPTIMIZERS.items() if e.available]


def baseline_names() -> list[str]:
    return [name for name, e in OPTIMIZERS.items() if e.family == "baseline"]
