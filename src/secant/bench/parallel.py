"""Independent runs side by side: ``secant bench --jobs N`` (``docs/bench.md``, Budgets and
divergence).

Every run of a benchmark is independent (its own model, optimizer and seeded batch order), so
``N`` worker processes can share them. Workers are forked, so they inherit the loaded data
and the optimizer registry without pickling either; only each run's record comes back. The
records are returned in the order of the tasks, whatever order the runs finish in, so the
results file and the report do not depend on ``N``. Runs that share the machine slow each
other down: steps to target and verdicts in steps do not change, measured times do.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

from secant.bench.runner import run_one

_TASKS: list = []  # set before the workers fork; read by index in them


def _run(i: int) -> dict:
    problem, entry, data, cfg = _TASKS[i]
    return run_one(problem, entry, data, cfg, progress=False)


def run_all(tasks: list[tuple], jobs: int, progress: bool) -> list[dict]:
    """``run_one`` for every ``(problem, entry, data, cfg)`` of ``tasks``, ``jobs`` at a time
    (in this process when ``jobs == 1``). With ``jobs > 1`` a line per finished run replaces
    the progress bars."""
    if jobs == 1:
        return [run_one(*t, progress=progress) for t in tasks]
    global _TASKS
    _TASKS = list(tasks)
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(_run, i) for i in range(len(tasks))]
            for n, f in enumerate(futures, 1):
                rec = f.result()
                if progress:
                    c = rec["config"]
                    print(f"[{n}/{len(tasks)}] {c['problem']}/{c['optimizer']} seed "
                          f"{c['seed']}: {rec['status']}", file=sys.stderr, flush=True)
            return [f.result() for f in futures]
    finally:
        _TASKS = []
