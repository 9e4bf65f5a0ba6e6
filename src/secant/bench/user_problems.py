"""Your own problem for ``secant bench`` and ``secant tune`` (``docs/bench.md``, Your own
problem): ``--problem FILE.py:FUNCTION`` or ``--problem package.module:function`` names a
function of no arguments that returns a :class:`~secant.bench.problems.Problem`.

A file is run as a module whose folder is put first on ``sys.path`` (so it can import its
neighbours, as ``python FILE.py`` would); a module is imported from the current folder or
``sys.path``. Everything that can go wrong in between (a missing file or module, an import
that raises, a missing or non-callable name, a function that raises or returns something
else than a ``Problem``) is a :class:`BenchError` of one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from secant.bench.data import BenchError, describe
from secant.bench.problems import PROBLEMS, Problem, get_problem


def resolve(item: Problem | str) -> Problem:
    """A :class:`Problem` as given, a spec (``FILE.py:FUNCTION``, ``module:function``)
    loaded, or a built-in problem's name looked up."""
    if isinstance(item, Problem):
        problem = item
    elif ":" in item:
        problem = load(item)
    elif item.endswith(".py"):
        raise BenchError(f"--problem {item}: name the function too, {item}:FUNCTION")
    else:
        return get_problem(item)
    if problem.name in PROBLEMS and PROBLEMS[problem.name] is not problem:
        raise BenchError(f"problem {problem.name!r}: the name of a built-in problem; give "
                         "yours another name (tuned values are kept by name)")
    return problem


def load(spec: str) -> Problem:
    """Call the function ``spec`` names and return the :class:`Problem` it returns."""
    where, _, func = spec.rpartition(":")
    if not where or not func.isidentifier():
        raise BenchError(f"--problem {spec}: expected FILE.py:FUNCTION or "
                         "package.module:function")
    module = _run_file(spec, Path(where)) if where.endswith(".py") else _import(spec, where)
    fn = getattr(module, func, None)
    if fn is None:
        raise BenchError(f"--problem {spec}: {where} defines no {func!r}")
    if not callable(fn):
        raise BenchError(f"--problem {spec}: {func} is not a function ({type(fn).__name__})")
    try:
        problem = fn()
    except Exception as exc:
        raise BenchError(f"--problem {spec}: {func}() raised {describe(exc)}") from None
    if not isinstance(problem, Problem):
        raise BenchError(f"--problem {spec}: {func}() returned {type(problem).__name__}, "
                         "expected a secant.bench.Problem")
    return problem


def _run_file(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise BenchError(f"--problem {spec}: file {path} not found")
    path = path.resolve()
    name = f"secant_user_problem_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise BenchError(f"--problem {spec}: running {path.name} raised "
                         f"{describe(exc)}") from None
    return module


def _import(spec: str, name: str) -> ModuleType:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise BenchError(f"--problem {spec}: cannot import {name} ({exc})") from None
    except Exception as exc:
        raise BenchError(f"--problem {spec}: importing {name} raised {describe(exc)}") from None
