"""The benchmark harness behind ``secant bench``: problems (data, model, loss, target), the
optimizer registry, the runner, scoring (time-to-target, performance profiles, speedups),
plots and reports. See ``secant bench --help``."""

from secant.bench.data import BenchError
from secant.bench.problems import PROBLEMS, Problem, get_problem
from secant.bench.registry import OPTIMIZERS, OptimizerEntry, available_optimizers, get_optimizer
from secant.bench.runner import RunConfig, run_one

__all__ = [
    "OPTIMIZERS",
    "PROBLEMS",
    "BenchError",
    "OptimizerEntry",
    "Problem",
    "RunConfig",
    "available_optimizers",
    "get_optimizer",
    "get_problem",
    "run_one",
]
