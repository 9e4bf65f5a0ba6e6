"""``secant bench`` and ``secant tune``: argument parsing, validation and the run loops."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from secant.bench import (
    calibration,
    distributed,
    parallel,
    report,
    tuned_table,
    tuning,
    user_problems,
)
from secant.bench.data import BenchError
from secant.bench.problems import PROBLEMS
from secant.bench.registry import OPTIMIZERS, available_optimizers, get_optimizer
from secant.bench.runner import RunConfig, epoch_steps, run_one
from secant.bench.suites import SUITES, get_suite
from secant.bench.tuned_table import TunedTable

BENCH_EPILOG = """\
With no arguments: the quick suite (--suite quick, what `make bench` runs): every available
optimizer on small real and synthetic problems, 3 seeds each, budgets in epochs,
within 10 minutes on 2 CPU cores. The report's first table is the verdict: per problem,
who reaches the target first and by what factor the best secant method beats or trails the
best baseline, in steps and in time, with the range over seeds. Learning rates, second
knobs and targets come from the package's tuning table, or from yours (--tuned PATH, written
by secant tune --write PATH); --lr overrides. Your own model: --problem FILE.py:FUNCTION,
a function returning a secant.bench.Problem. Outputs in
--out: results.json, report.md, loss_vs_step.png, loss_vs_time.png and, with several
problems, performance_profile.png. See docs/bench.md.
"""


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (what was wrong, what is expected), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 1")
    return v


def _lr_override(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected OPT=VALUE, e.g. adam=0.001")
    if name not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown optimizer {name!r}, expected one of {', '.join(OPTIMIZERS)}")
    return name, _positive_float(value)


def _common(p: argparse.ArgumentParser, listing: str) -> None:
    w = p.add_mutually_exclusive_group()
    w.add_argument("--suite", metavar="NAME",
                   help=f"a named suite: {', '.join(SUITES)} (default quick{listing})")
    w.add_argument("--problem", metavar="NAME[,NAME...]",
                   help="problem(s), comma-separated, instead of a suite: built-in "
                   f"({', '.join(PROBLEMS)}) or your own, FILE.py:FUNCTION or "
                   "package.module:function, a function returning a secant.bench.Problem "
                   "(docs/bench.md)")
    p.add_argument("--optimizers", metavar="a,b,...",
                   help="optimizers, comma-separated (default: the suite's contenders, else "
                   f"every available one{listing})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=_positive_float, metavar="E",
                   help="budget per run in epochs (default: the suite's or the problem's)")
    g.add_argument("--budget-seconds", type=_positive_float, metavar="S",
                   help="budget per run in seconds of training time instead of epochs")
    p.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help="minibatch size (default: the problem's, e.g. 1000 for curves)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where to train (default cpu)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="local data: MNIST IDX files (mnist), CIFAR-10 binary batches (cifar10)")
    p.add_argument("--synthetic", action="store_true",
                   help="cifar10*: random CIFAR-shaped data (throughput only)")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                   help="torch CPU threads (default 1: on a shared CPU, more threads than free "
                   "cores make step times erratic; raise it on an idle machine)")
    p.add_argument("--evals", type=_positive_int, default=40, metavar="N",
                   help="evaluations per run on the fixed subsets (default 40)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="compare optimizers: table, plots, report",
                       description="Run optimizers on benchmark problems and report which "
                       "reaches the target loss first, in steps and in wall-clock.",
                       epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, "; --list")
    p.add_argument("--seeds", type=_positive_int, metavar="N",
                   help="evaluation seeds 0..N-1 per optimizer (default: the suite's, 3; 1 "
                   "with --problem)")
    p.add_argument("--lr", type=_lr_override, action="append", default=[], metavar="OPT=VALUE",
                   help="learning-rate override, repeatable (e.g. --lr adam=3e-3)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder, new or empty (default: a new timestamped folder in "
                   "./bench-results/)")
    p.add_argument("--equal-cost", metavar="OPT",
                   help="equal-cost budgets: every optimizer gets the cost of OPT's epoch "
                   "budget (costs per step calibrated first, interleaved, in process CPU "
                   "time); cheaper optimizers run more steps (docs/bench.md)")
    p.add_argument("--tuned", metavar="PATH",
                   help="tuned learning rates, knobs and targets from a file secant tune "
                   "--write made; its problems' entries replace the package's")
    p.add_argument("--note", default="", help="free text stored in results.json and report.md")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="runs side by side in N processes (default 1); verdicts in steps do not "
                   "change, measured times are those of the shared machine")
    p.add_argument("--list", action="store_true",
                   help="list suites, problems and optimizers with one-line descriptions, then "
                   "exit")
    return p


def add_tune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("tune", help="learning-rate and second-knob search; writes the table",
                       description="For each problem and optimizer, at the full budget and on "
                       "tuning seeds the evaluation does not use: search the learning rate, then "
                       "the method's second knob (damping, beta, weight decay), on log grids "
                       "extended while the best value sits on an edge; then run the tuned "
                       "baselines on reference seeds and set the target (docs/bench.md).")
    _common(p, "")
    p.add_argument("--tune-seeds", type=_positive_int, default=1, metavar="N",
                   help=f"tuning seeds {tuning.TUNE_SEED}.. (default 1); the score is the median "
                   "final training loss over them")
    p.add_argument("--grid", action="append", default=[], metavar="OPT=LR:LR:...",
                   help="replace an optimizer's learning-rate grid (default: the registry's)")
    p.add_argument("--knob-grid", action="append", default=[], metavar="OPT=V:V:...",
                   help="replace an optimizer's second-knob grid; a single value fixes the knob "
                   "there (no search)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--write", metavar="PATH",
                   help="save the tuned values to this JSON file, for secant bench --tuned PATH: "
                   "a new file, or one secant tune wrote (updated, its other entries kept); "
                   "checked before training, rewritten after every tuned optimizer; never "
                   "inside the installed package (without --write the values are printed only)")
    w.add_argument("--write-package", action="store_true",
                   help="maintainers: refresh the package's own table "
                   "(src/secant/bench/tuned.json) instead")
    p.add_argument("--markdown", metavar="PATH",
                   help="append the log as Markdown here (checked before training)")
    p.set_defaults(evals=8)  # the score needs only the end of each run
    return p


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _resolve(args: argparse.Namespace) -> tuple[list, list]:
    """Problems (with ``args.problem_epochs`` set from the suite), optimizers; checks.
    ``args.problem`` is the flag's text or, from the Python API, a list of problems."""
    if args.problem is not None:
        items = args.problem if isinstance(args.problem, list) else _split(args.problem)
        if not items:
            raise BenchError("--problem is empty; expected one or more of: "
                             + ", ".join(PROBLEMS) + ", or FILE.py:FUNCTION")
        args.problem_epochs = {}
        args.suite_seeds = 1
        suite_optimizers = ()
    else:
        suite = get_suite(args.suite or "quick")
        items = suite.problems(args.data_dir)
        args.problem_epochs = dict(suite.epochs)
        args.suite_seeds = suite.seeds
        suite_optimizers = suite.optimizers
        if args.data_dir is None and set(items) & set(suite.synthetic_without_data):
            args.synthetic = True
    problems = [user_problems.resolve(i) for i in items]
    problem_names = [p.name for p in problems]
    if len(set(problem_names)) < len(problem_names):
        raise BenchError(f"--problem: a problem name appears twice "
                         f"({', '.join(problem_names)})")
    names = (_split(args.optimizers) if args.optimizers else
             [n for n in available_optimizers() if not suite_optimizers or n in suite_optimizers])
    entries = [get_optimizer(n) for n in names]
    if not entries:
        raise BenchError("--optimizers is empty; expected names from: " + ", ".join(OPTIMIZERS))
    _check_something_to_run(problems, entries, named=bool(args.optimizers))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available in this torch build; use cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return problems, entries


def _check_something_to_run(problems: list, entries: list, named: bool) -> None:
    """Every problem gets a run and, when the optimizers were named, every optimizer too."""
    for p in problems:
        if not any(e.applies_to(p) for e in entries):
            raise BenchError(f"nothing to run on {p.name}: its model has no Linear or Conv2d "
                             f"layer, and the optimizers given "
                             f"({', '.join(e.name for e in entries)}) work only on those")
    for e in entries if named else ():
        if not any(e.applies_to(p) for p in problems):
            raise BenchError(f"nothing to run for {e.name}: it works only on Linear and Conv2d "
                             f"layers, and the model of {', '.join(p.name for p in problems)} "
                             "has none")


def _load(args: argparse.Namespace, problems: list) -> dict:
    """Every problem's data, each checked on one forward pass of its model."""
    datasets = {}
    for p in problems:
        datasets[p.name] = p.load(args.data_dir, args.synthetic)
        p.check(datasets[p.name])
    return datasets


def _epochs(args, problem) -> float | None:
    if args.budget_seconds:
        return None
    return args.epochs or args.problem_epochs.get(problem.name, problem.budget_epochs)


def _config(args, problem, entry, lr, lr_source, seed, knob) -> RunConfig:
    return RunConfig(problem.name, entry.name, lr, lr_source, seed,
                     args.batch_size or problem.batch_size, args.budget_seconds,
                     _epochs(args, problem), args.device, args.evals, dict(knob))


def _equal_cost_epochs(args, problem, settings: dict, data, record: dict) -> dict[str, float]:
    """``--equal-cost REF``: each applicable optimizer's budget in epochs, for the cost of
    REF's epoch budget (:mod:`secant.bench.calibration`); the calibration goes in ``record``."""
    ref = args.equal_cost
    run = {n: s for n, s in settings.items() if s[0].applies_to(problem)}
    if ref not in run:
        raise BenchError(f"--equal-cost {ref}: not among the optimizers run on {problem.name} "
                         f"({', '.join(run)})")
    batch = min(args.batch_size or problem.batch_size, len(data.x_train))
    per_epoch = epoch_steps(len(data.x_train), batch)
    ref_steps = math.ceil(_epochs(args, problem) * per_epoch)
    print(f"{problem.name}: calibrating the cost per step of {', '.join(run)} ...",
          file=sys.stderr)
    costs = calibration.calibrate(problem, [(e, lr, knob) for e, lr, knob, _ in run.values()],
                                  data, batch, torch.device(args.device))
    steps = calibration.equal_cost_steps(costs, ref, ref_steps)
    record[problem.name] = {"reference": ref, "reference_steps": ref_steps,
                            "cost_per_step": costs, "steps": steps}
    return {name: n / per_epoch for name, n in steps.items()}


def _list() -> str:
    lines = ["suites:"]
    for s in SUITES.values():
        budgets = ", ".join(f"{p} {e:g} ep" for p, e in s.epochs.items())
        lines.append(f"  {s.name:<12} {s.description} [{budgets}; {s.seeds} seeds]")
    lines.append("problems:")
    for p in PROBLEMS.values():
        lines.append(f"  {p.name:<12} {p.description}")
    lines.append(f"  {'FILE.py:FUNCTION':<12} your own: a function returning a "
                 "secant.bench.Problem (or package.module:function; docs/bench.md)")
    lines.append("optimizers:")
    for e in OPTIMIZERS.values():
        mark = "" if e.available else " [not available here]"
        lines.append(f"  {e.name:<12} {e.description}{mark}")
    return "\n".join(lines)


def _meta(args, argv_text: str) -> dict:
    config = {k: v for k, v in vars(args).items() if k != "command"}
    if isinstance(args.problem, list):  # from the Python API: names, not the objects
        config["problem"] = ",".join(p if isinstance(p, str) else p.name for p in args.problem)
    return {"command": argv_text, "note": getattr(args, "note", ""),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "versions": report.versions(), "machine": report.machine_info(args.device),
            "config": config}


def _problem_info(args, problem, table: TunedTable) -> dict:
    target, note = table.target(problem)
    return {"description": problem.description, "target": target, "target_note": note,
            "notes": problem.notes, "batch_size": args.batch_size or problem.batch_size,
            "budget_epochs": _epochs(args, problem), "budget_seconds": args.budget_seconds}


def _check_out(out: Path) -> None:
    """--out must be new or an empty folder: never overwrite earlier results."""
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out}: exists and is not a folder; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise BenchError(f"--out {out}: folder is not empty (earlier results?); give a new "
                         "or empty folder")


def _tuned(path: str | None) -> TunedTable:
    """The package's table, with ``--tuned PATH`` read over it."""
    if path is None:
        return tuned_table.package()
    try:
        return tuned_table.read(path).over(tuned_table.package())
    except BenchError as exc:
        raise BenchError(f"--tuned {exc}") from None


def bench(args: argparse.Namespace, argv_text: str) -> Path | None:
    """``secant bench``: run, score, report. Returns the output folder (``None`` for
    ``--list`` and on ranks other than 0 under torchrun)."""
    if args.list:
        print(_list())
        return None
    started = time.perf_counter()
    out = Path(args.out) if args.out else (
        Path("bench-results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    _check_out(out)
    table = _tuned(args.tuned)
    problems, entries = _resolve(args)
    overrides = dict(args.lr)
    for name in overrides:
        if name not in [e.name for e in entries]:
            raise BenchError(f"--lr {name}=...: {name} is not among the optimizers being run "
                             f"({', '.join(e.name for e in entries)})")
    with distributed.session(args.device) as (rank, world):
        seeds = args.seeds or args.suite_seeds
        datasets = _load(args, problems)
        meta = _meta(args, argv_text) | {"world_size": world}
        meta["config"]["seeds"] = seeds
        if args.jobs > 1 and world > 1:
            raise BenchError(f"--jobs {args.jobs}: not under torchrun (each rank runs one process)")
        if args.equal_cost and args.budget_seconds:
            raise BenchError("--equal-cost sets each optimizer's budget from the reference's "
                             "epochs: give --epochs (or none), not --budget-seconds")
        if args.equal_cost and world > 1:
            raise BenchError("--equal-cost: not under torchrun (calibrate on one process)")
        tasks, equal_cost = [], {}
        for p in problems:
            settings = {}
            for e in entries:
                lr, knob, src = table.settings(e, p.name)
                if e.name in overrides:
                    lr, src = overrides[e.name], "override"
                settings[e.name] = (e, lr, knob, src)
            epochs = (_equal_cost_epochs(args, p, settings, datasets[p.name], equal_cost)
                      if args.equal_cost else {})
            for e, lr, knob, src in settings.values():
                for seed in range(seeds):
                    cfg = _config(args, p, e, lr, src, seed, knob)
                    if e.name in epochs:
                        cfg.epochs = epochs[e.name]
                    tasks.append((p, e, datasets[p.name], cfg))
        runs = parallel.run_all(tasks, args.jobs, progress=not args.no_progress and rank == 0)
        if rank != 0:  # under torchrun, rank 0 reports
            return None
        info = {p.name: _problem_info(args, p, table) | (
            {"equal_cost": equal_cost[p.name]} if p.name in equal_cost else {})
            for p in problems}
        meta["wall_seconds"] = time.perf_counter() - started
        summary, verdicts = report.write_outputs(out, meta, info, runs)
        targets = {p: i["target"] for p, i in info.items()}
        print("\nverdict (steps to target, median [range] over seeds)")
        print(report.text_table(report.verdict_rows(verdicts, targets), report.VERDICT_HEADER))
        for p in problems:
            tgt = info[p.name]["target"]
            print(f"\n{p.name} (target {'none' if tgt is None else format(tgt, '.4g')})")
            print(report.text_table(report.table_rows(summary, p.name)))
        print(f"\nwrote {out}/ (results.json, report.md, plots) in {meta['wall_seconds']:.0f} s")
        return out


def _parse_grid(items: list[str], flag: str = "--grid") -> dict[str, list[float]]:
    grids = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in OPTIMIZERS:
            raise BenchError(f"{flag} {item!r}: expected OPT=V:V:... with OPT one of "
                             f"{', '.join(OPTIMIZERS)}")
        if flag == "--knob-grid" and OPTIMIZERS[name].knob is None:
            raise BenchError(f"{flag} {item!r}: {name} has no second knob")
        try:
            grids[name] = sorted(_positive_float(v) for v in values.split(":"))
        except argparse.ArgumentTypeError as exc:
            raise BenchError(f"{flag} {item!r}: {exc}") from None
        if flag == "--grid" and len(grids[name]) < 2:
            raise BenchError(f"{flag} {item!r}: a learning-rate grid needs at least two values")
    return grids


def _knob(entry, knob_grids: dict[str, list[float]]):
    """The entry's knob, with its grid replaced by ``--knob-grid`` (a single value: fixed
    there, its default moved to it)."""
    if entry.name not in knob_grids:
        return entry.knob
    grid = tuple(knob_grids[entry.name])
    default = entry.knob.default if entry.knob.default in grid else grid[len(grid) // 2]
    return dataclasses.replace(entry.knob, grid=grid, default=default)


def _cached_runner(args, problem, entry, data, cache: dict):
    """``run(lr, knob, seed)``: one run of ``entry`` on ``problem``, cached in ``cache``."""
    def run(lr: float, knob: dict, seed: int) -> dict:
        key = (entry.name, lr, tuple(sorted(knob.items())), seed)
        if key not in cache:
            cfg = _config(args, problem, entry, lr, "grid", seed, knob)
            cache[key] = run_one(problem, entry, data, cfg, progress=not args.no_progress)
        return cache[key]
    return run


def _tune_seeds(args) -> list[int]:
    return [tuning.TUNE_SEED + i for i in range(args.tune_seeds)]


def _emit(args, lines: list[str]) -> None:
    """Part of the Markdown log: appended to ``--markdown``, else printed."""
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    else:
        print("\n".join(lines))


def tune(args: argparse.Namespace, argv_text: str) -> TunedTable:
    """``secant tune``: every problem's choices and target, saved to ``--write`` (or
    ``--write-package``) after every tuned optimizer. Returns the table (with a file to
    write, all that the file holds)."""
    args.lr_grids = _parse_grid(args.grid)
    args.knob_grids = _parse_grid(args.knob_grid, "--knob-grid")
    path = tuned_table.PACKAGE_FILE if args.write_package else (
        Path(args.write) if args.write else None)
    table = tuned_table.check_target(path, args.write_package) if path else TunedTable()
    if args.markdown:
        tuned_table.check_writable(Path(args.markdown), f"--markdown {args.markdown}")
    problems, entries = _resolve(args)
    datasets = _load(args, problems)
    if path is None:
        print("secant tune: no --write PATH: the tuned values are printed, not saved",
              file=sys.stderr)

    def save() -> None:
        if path is not None:
            tuned_table.write(table, path)

    seeds = _tune_seeds(args)
    _emit(args, [f"## `{argv_text}`", "",
                 f"{dt.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads; "
                 f"{report.machine_info(args.device)['platform']}; tuning seeds {seeds}, "
                 f"reference seeds {list(tuning.REFERENCE_SEEDS)}.", ""])
    for p in problems:
        _emit(args, _tune_problem(args, argv_text, p, datasets[p.name], entries, table, save))
    if path:
        print(f"wrote {path}")
    if args.markdown:
        print(f"appended to {args.markdown}")
    return table


def _tune_problem(args, argv_text: str, p, data, entries: list, table: TunedTable,
                  save) -> list[str]:
    """Tune every entry that applies to ``p``, then set ``p``'s target; every choice goes into
    ``table`` and is saved at once (``save()``). Returns the Markdown log of ``p``."""
    seeds = _tune_seeds(args)
    budget = (f"{args.budget_seconds:g} s" if args.budget_seconds else
              f"{_epochs(args, p):g} epochs")
    md = [f"### {p.name} ({budget}, batch {args.batch_size or p.batch_size})", "",
          "| optimizer | lr | knob | final train loss | note |", "|---|---|---|---|---|"]
    choices = table.choices.setdefault(p.name, {})
    cache: dict = {}
    reference = {}  # tuned baseline -> run(seed) at its choice, for the target
    for e in (e for e in entries if e.applies_to(p)):
        run = _cached_runner(args, p, e, data, cache)
        c = tuning.tune_entry(run, args.lr_grids.get(e.name, list(e.lr_grid)),
                              _knob(e, args.knob_grids), seeds)
        if c["lr"] is None:
            choices.pop(e.name, None)
            md.append(f"| {e.name} | — | — | — | {c['lr_note']}: not chosen |")
            save()
            continue
        note = "; ".join(n for n in (c["lr_note"] and f"lr {c['lr_note']}",
                                     c["knob_note"] and f"knob {c['knob_note']}") if n)
        knob = ", ".join(f"{k} {v:g}" for k, v in c["knob"].items()) or "—"
        md.append(f"| {e.name} | {c['lr']:g} | {knob} | {c['loss']:.5g} | "
                  f"{note or 'inside the grid'} |")
        pts = "; ".join(f"lr {q['lr']:g}" + "".join(f", {k} {q[k]:g}" for k in c["knob"])
                        + f": {'diverged' if q['loss'] is None else format(q['loss'], '.4g')}"
                        for q in c["points"])
        md.append(f"| | | | | tried: {pts} |")
        print(f"{p.name}/{e.name}: lr {c['lr']:g} {knob} (final train loss "
              f"{c['loss']:.5g}) {note}")
        choices[e.name] = c
        save()
        if e.family == "baseline":
            reference[e.name] = lambda seed, run=run, c=c: run(c["lr"], c["knob"], seed)
    finals = {n: [tuning.target_loss(r(s)) for s in tuning.REFERENCE_SEEDS]
              for n, r in reference.items()}
    rule = tuning.scoring.target_from_reference(finals)
    if rule is not None:
        loss, base = rule
        table.targets[p.name] = {
            "loss": float(f"{loss:.6g}"), "baseline": base,
            "seeds": list(tuning.REFERENCE_SEEDS), "budget": budget,
            "how": f"median over seeds {list(tuning.REFERENCE_SEEDS)} of the training-subset "
                   f"loss of the best tuned baseline ({base}, lr {choices[base]['lr']:g}) at "
                   f"3/4 of {budget} at batch {args.batch_size or p.batch_size}, in "
                   f"`{argv_text}`"}
        save()
        md += ["", f"Target {loss:.6g}: {table.targets[p.name]['how']}. Baselines' median "
               "losses at 3/4 of the budget: " + ", ".join(
                   f"{b} {tuning.scoring.median_or_inf(v):.5g}" for b, v in finals.items())]
    md.append("")
    return md


@contextlib.contextmanager
def _threads_kept():
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting as it was


def execute(args: argparse.Namespace, argv_text: str):
    """``bench`` or ``tune`` on parsed ``args`` (``args.command``), leaving torch's thread
    count as it was; bad input raises :class:`BenchError` before any training."""
    with _threads_kept():
        return bench(args, argv_text) if args.command == "bench" else tune(args, argv_text)


def dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    """The command line's exit status: 0, or 2 with a one-line message on bad input."""
    try:
        execute(args, "secant " + shlex.join(argv))
    except BenchError as exc:
        print(f"secant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
