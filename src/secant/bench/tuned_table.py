"""Tuning tables: the values ``secant tune`` chooses and ``secant bench`` reads
(``docs/bench.md``, Tuned values).

A table is a JSON file with a format marker::

    {"format": "secant-tuned/1", "about": "...", "choices": {...}, "targets": {...}}

``choices[problem][optimizer]``: the chosen ``lr`` and ``knob`` (the second hyperparameter),
their score (``loss``: median final training loss over the tuning seeds), why a value is not
strictly inside its grid (``lr_note``, ``knob_note``; empty when it is) and every point tried.
``targets[problem]``: the target loss, the baseline and seeds it comes from, and how.

The package's own table (``tuned.json`` beside this module) holds the built-in problems'
values. A user's ``secant tune --write PATH`` writes a table of their own, which
``secant bench --tuned PATH`` reads over the package's. ``tune`` writes only to a new file or
to one holding the marker (a table it wrote, which it updates), never inside the installed
package unless a maintainer asks for the package's table (``--write-package``); it writes
atomically, after every tuned optimizer, so a crash keeps what was already chosen.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import secant
from secant.bench.data import BenchError

FORMAT = "secant-tuned/1"
PACKAGE_FILE = Path(__file__).with_name("tuned.json")
ABOUT = ("Tuned values written by `secant tune` (docs/bench.md, Tuning, Targets and Tuned "
         "values). choices[problem][optimizer]: the chosen lr and knob, their score (loss: "
         "median final training loss over the tuning seeds), why a value is not strictly "
         "inside its grid (lr_note, knob_note) and every point tried. targets[problem]: the "
         "target loss, the baseline and seeds it comes from, and how.")


@dataclass
class TunedTable:
    """Chosen hyperparameters and targets, per problem name."""

    choices: dict = field(default_factory=dict)  # problem -> optimizer -> choice
    targets: dict = field(default_factory=dict)  # problem -> target record

    def settings(self, entry, problem: str) -> tuple[float, dict, str]:
        """``(lr, knob, source)`` for optimizer ``entry`` on ``problem``: the tuned values
        (source ``"tuned"``), else the registry's defaults (``"default"``)."""
        c = self.choices.get(problem, {}).get(entry.name)
        if entry.knob is None:
            knob = {}
        else:
            value = (c or {}).get("knob", {}).get(entry.knob.name, entry.knob.default)
            knob = {entry.knob.name: float(value)}
        if c is None:
            return entry.default_lr, knob, "default"
        return float(c["lr"]), knob, "tuned"

    def target(self, problem) -> tuple[float | None, str]:
        """``(loss, how)`` for a :class:`~secant.bench.problems.Problem`: the target its
        definition sets, else this table's, else none."""
        if problem.target is not None:
            return float(problem.target), "set in the problem's definition"
        entry = self.targets.get(problem.name)
        if entry is None:
            return None, ("no target: this problem has not been tuned (secant tune --write "
                          "PATH, then secant bench --tuned PATH)")
        return float(entry["loss"]), str(entry["how"])

    def over(self, base: TunedTable) -> TunedTable:
        """This table read over ``base``: a problem this table has replaces base's entry."""
        return TunedTable({**base.choices, **self.choices}, {**base.targets, **self.targets})

    def to_json(self) -> str:
        doc = {"format": FORMAT, "about": ABOUT, "choices": self.choices,
               "targets": self.targets}
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def read(path: str | Path) -> TunedTable:
    """The table in ``path``; :class:`BenchError` unless it is a file ``secant tune`` wrote."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BenchError(f"{path}: not a table written by secant tune ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BenchError(f'{path}: not a table written by secant tune (no "format": '
                         f'"{FORMAT}")')
    choices, targets = doc.get("choices", {}), doc.get("targets", {})
    if not (isinstance(choices, dict) and isinstance(targets, dict)):
        raise BenchError(f"{path}: malformed table (choices and targets must be objects)")
    return TunedTable(choices, targets)


@functools.cache
def package() -> TunedTable:
    """The package's own table (the built-in problems' tuned values)."""
    return read(PACKAGE_FILE)


def check_writable(path: Path, flag: str, inside_package: bool = False) -> None:
    """Check, before any training, that ``path`` may be written: a file (new or writable) in
    an existing folder this process can write in, outside the installed package unless
    ``inside_package`` (the maintainers' refresh of the package's table). :class:`BenchError`
    names ``flag``."""
    package_dir = Path(secant.__file__).resolve().parent
    if not inside_package and path.resolve().is_relative_to(package_dir):
        raise BenchError(f"{flag}: is inside the installed secant package ({package_dir}); "
                         "write your own file (read it with secant bench --tuned PATH)")
    if path.is_dir():
        raise BenchError(f"{flag}: is a folder; give a file path")
    if not path.parent.is_dir():
        raise BenchError(f"{flag}: folder {path.parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise BenchError(f"{flag}: cannot write in folder {path.parent} "
                         f"({exc.strerror or exc})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise BenchError(f"{flag}: the file is read-only")


def check_target(path: Path, package_file: bool = False) -> TunedTable:
    """Check, before any training, that ``tune`` may write its table to ``path``
    (:func:`check_writable`; ``package_file``: the package's own table) and that ``path`` is
    new or a table ``tune`` wrote; return what is there already (an empty table for a new
    file). :class:`BenchError` says which rule fails."""
    flag = "--write-package" if package_file else f"--write {path}"
    check_writable(path, flag, inside_package=package_file)
    if not path.exists():
        return TunedTable()
    try:
        return read(path)
    except BenchError:
        raise BenchError(f"{flag}: exists and is not a table secant tune wrote; refusing to "
                         "overwrite it, give a new path") from None


def write(table: TunedTable, path: Path) -> None:
    """Write ``table`` to ``path`` atomically: a new file in the same folder, renamed over
    ``path``, so a reader (or a crash) never sees half a table."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(table.to_json())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
