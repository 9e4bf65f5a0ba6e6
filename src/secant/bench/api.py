"""The harness from Python: :func:`run` and :func:`tune` do what ``secant bench --problem``
and ``secant tune --problem`` do, through the same code, on problems given as objects
(``docs/bench.md``, Your own problem).

Every option is the command's flag as a keyword: ``budget_seconds=5`` is
``--budget-seconds 5``; a list is joined with commas (``optimizers=["adam", "kfac"]``); a dict
repeats the flag once per item, a list value joined with colons (``lr={"adam": 3e-3}`` is
``--lr adam=0.003``, ``grid={"sgd": [0.01, 0.1]}`` is ``--grid sgd=0.01:0.1``); ``True`` turns
a switch on. Bad input raises :class:`~secant.bench.data.BenchError` before any training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from secant.bench import cli
from secant.bench.data import BenchError
from secant.bench.problems import Problem
from secant.bench.tuned_table import TunedTable


def run(problems: Problem | str | list, *, progress: bool = True, **options) -> Path:
    """Benchmark ``problems`` (a :class:`Problem`, a built-in name, a ``FILE.py:FUNCTION``
    spec, or a list of these) as ``secant bench`` does, e.g. ``run(problem,
    optimizers=["adam", "kfac"], seeds=3, out="results", tuned="tuned.json")``. Returns the
    output folder: ``results.json``, ``report.md`` and the plots."""
    return _execute("bench", problems, progress, options)


def tune(problems: Problem | str | list, *, progress: bool = True, **options) -> TunedTable:
    """Tune ``problems`` as ``secant tune`` does, e.g. ``tune(problem, optimizers=["sgd",
    "adam"], write="tuned.json")``. Returns the table: the choices and targets made (with
    ``write``, all that the file holds)."""
    return _execute("tune", problems, progress, options)


class _Parser(argparse.ArgumentParser):
    """The command's parser, its errors raised instead of printed."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BenchError(message)


def _execute(command: str, problems, progress: bool, options: dict):
    if {"problem", "suite"} & set(options):
        raise BenchError("give the problems as the first argument (suites: the command line)")
    add_parser = cli.add_bench_parser if command == "bench" else cli.add_tune_parser
    parser = add_parser(_Parser(prog="secant").add_subparsers())
    args = parser.parse_args([*_flags(options), *([] if progress else ["--no-progress"])])
    args.command = command
    args.problem = list(problems) if isinstance(problems, (list, tuple)) else [problems]
    names = ", ".join(p if isinstance(p, str) else p.name for p in args.problem)
    text = f"secant.bench.{'run' if command == 'bench' else 'tune'}([{names}]" + "".join(
        f", {k}={v!r}" for k, v in options.items()) + ")"
    return cli.execute(args, text)


def _flags(options: dict) -> list[str]:
    """Keyword options as the command's flags."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, dict):
            for k, v in value.items():
                v = ":".join(map(str, v)) if isinstance(v, (list, tuple)) else v
                argv += [flag, f"{k}={v}"]
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(map(str, value))]
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv
