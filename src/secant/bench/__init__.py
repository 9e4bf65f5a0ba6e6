"""The benchmark harness behind ``secant bench`` and ``secant tune``: problems (data, model,
loss, target), the optimizer registry, the runner, tuning tables, scoring (time-to-target,
performance profiles, speedups), plots and reports. See ``secant bench --help`` and
``docs/bench.md``.

Your own model: a :class:`Problem` (``help(secant.bench.Problem)``), benchmarked with
:func:`run` and tuned with :func:`tune`, or from the command line with
``--problem FILE.py:FUNCTION``.
"""

from secant.bench.api import run, tune
from secant.bench.data import BenchError
from secant.bench.problems import PROBLEMS, Dataset, Problem, get_problem
from secant.bench.registry import OPTIMIZERS, OptimizerEntry, available_optimizers, get_optimizer
from secant.bench.runner import RunConfig, run_one
from secant.bench.tuned_table import TunedTable

__all__ = [
    "OPTIMIZERS",
    "PROBLEMS",
    "BenchError",
    "Dataset",
    "OptimizerEntry",
    "Problem",
    "RunConfig",
    "TunedTable",
    "available_optimizers",
    "get_optimizer",
    "get_problem",
    "run",
    "run_one",
    "tune",
]
