"""``secant bench`` and ``secant tune``: argument parsing, validation and the run loops."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import pprint
import shlex
import sys
import time
from pathlib import Path

import torch

from secant.bench import distributed, parallel, report, tuning
from secant.bench.data import BenchError
from secant.bench.problems import PROBLEMS, get_problem
from secant.bench.registry import OPTIMIZERS, available_optimizers, get_optimizer
from secant.bench.runner import RunConfig, run_one
from secant.bench.suites import SUITES, get_suite
from secant.bench.tuned import TUNED

BENCH_EPILOG = """\
With no arguments: the quick suite (--suite quick, what `make bench` runs): every available
optimizer on small real and synthetic problems, 3 seeds each, budgets in epochs,
within 10 minutes on 2 CPU cores. The report's first table is the verdict: per problem,
who reaches the target first and by what factor the best secant method beats or trails the
best baseline, in steps and in time, with the range over seeds. Learning rates and second
knobs come from the committed tuning table (secant tune), --lr overrides. Outputs in
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
                   help=f"problem(s), comma-separated, instead of a suite: {', '.join(PROBLEMS)}")
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
    p.add_argument("--write", metavar="PATH",
                   help="update this tuning table (a Python file like secant/bench/tuned.py)")
    p.add_argument("--markdown", metavar="PATH", help="append the log as Markdown here")
    p.set_defaults(evals=8)  # the score needs only the end of each run
    return p


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _resolve(args: argparse.Namespace) -> tuple[list, list]:
    """Problems (with ``args.problem_epochs`` set from the suite), optimizers; checks."""
    if args.problem is not None:
        names = _split(args.problem)
        if not names:
            raise BenchError("--problem is empty; expected one or more of: "
                             + ", ".join(PROBLEMS))
        args.problem_epochs = {}
        args.suite_seeds = 1
        suite_optimizers = ()
    else:
        suite = get_suite(args.suite or "quick")
        names = suite.problems(args.data_dir)
        args.problem_epochs = dict(suite.epochs)
        args.suite_seeds = suite.seeds
        suite_optimizers = suite.optimizers
        if args.data_dir is None and set(names) & set(suite.synthetic_without_data):
            args.synthetic = True
    problems = [get_problem(n) for n in names]
    names = (_split(args.optimizers) if args.optimizers else
             [n for n in available_optimizers() if not suite_optimizers or n in suite_optimizers])
    entries = [get_optimizer(n) for n in names]
    if not entries:
        raise BenchError("--optimizers is empty; expected names from: " + ", ".join(OPTIMIZERS))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available in this torch build; use cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return problems, entries


def _epochs(args, problem) -> float | None:
    if args.budget_seconds:
        return None
    return args.epochs or args.problem_epochs.get(problem.name, problem.budget_epochs)


def _config(args, problem, entry, lr, lr_source, seed, knob) -> RunConfig:
    return RunConfig(problem.name, entry.name, lr, lr_source, seed,
                     args.batch_size or problem.batch_size, args.budget_seconds,
                     _epochs(args, problem), args.device, args.evals, dict(knob))


def _list() -> str:
    lines = ["suites:"]
    for s in SUITES.values():
        budgets = ", ".join(f"{p} {e:g} ep" for p, e in s.epochs.items())
        lines.append(f"  {s.name:<12} {s.description} [{budgets}; {s.seeds} seeds]")
    lines.append("problems:")
    for p in PROBLEMS.values():
        lines.append(f"  {p.name:<12} {p.description}")
    lines.append("optimizers:")
    for e in OPTIMIZERS.values():
        mark = "" if e.available else " [not available here]"
        lines.append(f"  {e.name:<12} {e.description}{mark}")
    return "\n".join(lines)


def _meta(args, argv_text: str) -> dict:
    return {"command": argv_text, "note": getattr(args, "note", ""),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "versions": report.versions(), "machine": report.machine_info(args.device),
            "config": {k: v for k, v in vars(args).items() if k not in ("command",)}}


def _problem_info(args, problem) -> dict:
    return {"description": problem.description, "target": problem.target,
            "target_note": problem.target_note, "notes": problem.notes,
            "batch_size": args.batch_size or problem.batch_size,
            "budget_epochs": _epochs(args, problem), "budget_seconds": args.budget_seconds}


def _check_out(out: Path) -> None:
    """--out must be new or an empty folder: never overwrite earlier results."""
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out}: exists and is not a folder; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise BenchError(f"--out {out}: folder is not empty (earlier results?); give a new "
                         "or empty folder")


def bench(args: argparse.Namespace, argv_text: str) -> int:
    if args.list:
        print(_list())
        return 0
    started = time.perf_counter()
    out = Path(args.out) if args.out else (
        Path("bench-results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    _check_out(out)
    problems, entries = _resolve(args)
    with distributed.session(args.device) as (rank, world):
        seeds = args.seeds or args.suite_seeds
        overrides = dict(args.lr)
        for name in overrides:
            if name not in [e.name for e in entries]:
                raise BenchError(f"--lr {name}=...: {name} is not among the optimizers being run "
                                 f"({', '.join(e.name for e in entries)})")
        datasets = {p.name: p.load(args.data_dir, args.synthetic) for p in problems}
        meta = _meta(args, argv_text) | {"world_size": world}
        meta["config"]["seeds"] = seeds
        if args.jobs > 1 and world > 1:
            raise BenchError(f"--jobs {args.jobs}: not under torchrun (each rank runs one process)")
        tasks = []
        for p in problems:
            for e in entries:
                lr, src = (overrides[e.name], "override") if e.name in overrides else (
                    e.lr_for(p.name), e.lr_source(p.name))
                for seed in range(seeds):
                    cfg = _config(args, p, e, lr, src, seed, e.knob_for(p.name))
                    tasks.append((p, e, datasets[p.name], cfg))
        runs = parallel.run_all(tasks, args.jobs, progress=not args.no_progress and rank == 0)
        if rank != 0:  # under torchrun, rank 0 reports
            return 0
        info = {p.name: _problem_info(args, p) for p in problems}
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
        return 0


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


def tune(args: argparse.Namespace, argv_text: str) -> int:
    problems, entries = _resolve(args)
    grids = _parse_grid(args.grid)
    knob_grids = _parse_grid(args.knob_grid, "--knob-grid")
    seeds = [tuning.TUNE_SEED + i for i in range(args.tune_seeds)]
    table = {k: dict(v) for k, v in TUNED.items() if k in ("choices", "targets")}
    md = [f"## `{argv_text}`", "",
          f"{dt.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {report.machine_info(args.device)['platform']}; "
          f"tuning seeds {seeds}, reference seeds {list(tuning.REFERENCE_SEEDS)}.", ""]
    for p in problems:
        data = p.load(args.data_dir, args.synthetic)
        budget = (f"{args.budget_seconds:g} s" if args.budget_seconds else
                  f"{_epochs(args, p):g} epochs")
        md += [f"### {p.name} ({budget}, batch {args.batch_size or p.batch_size})", "",
               "| optimizer | lr | knob | final train loss | note |", "|---|---|---|---|---|"]
        choices = dict(table.get("choices", {}).get(p.name, {}))
        cache: dict = {}
        for e in entries:
            if e.needs_layers and not p.layer_optimizers:
                continue
            run = _cached_runner(args, p, e, data, cache)
            c = tuning.tune_entry(run, grids.get(e.name, list(e.lr_grid)),
                                  _knob(e, knob_grids), seeds)
            if c["lr"] is None:
                choices.pop(e.name, None)
                md.append(f"| {e.name} | — | — | — | {c['lr_note']}: not chosen |")
                continue
            c["run"] = lambda seed, c=c, run=run: run(c["lr"], c["knob"], seed)
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
        finals = {n: [tuning.target_loss(c["run"](s)) for s in tuning.REFERENCE_SEEDS]
                  for n, c in choices.items() if "run" in c and OPTIMIZERS[n].family == "baseline"}
        for c in choices.values():
            c.pop("run", None)
        table.setdefault("choices", {})[p.name] = choices
        rule = tuning.scoring.target_from_reference(finals)
        if rule is not None:
            loss, base = rule
            table.setdefault("targets", {})[p.name] = {
                "loss": float(f"{loss:.6g}"), "baseline": base,
                "seeds": list(tuning.REFERENCE_SEEDS), "budget": budget,
                "how": f"median over seeds {list(tuning.REFERENCE_SEEDS)} of the training-subset "
                       f"loss of the best tuned baseline ({base}, lr {choices[base]['lr']:g}) at "
                       f"3/4 of {budget} at batch "
                       f"{args.batch_size or p.batch_size}, in `{argv_text}`"}
            md += ["", f"Target {loss:.6g}: {table['targets'][p.name]['how']}. Baselines' "
                   "median losses at 3/4 of the budget: " + ", ".join(
                       f"{b} {tuning.scoring.median_or_inf(v):.5g}" for b, v in finals.items())]
        md.append("")
    if args.write:
        doc = sys.modules["secant.bench.tuned"].__doc__ or ""
        Path(args.write).write_text(f'"""{doc}"""\n\nTUNED: dict = '
                                    + pprint.pformat(table, width=95, sort_dicts=True) + "\n")
        print(f"wrote {args.write}")
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n".join(md) + "\n")
        print(f"appended to {args.markdown}")
    else:
        print("\n".join(md))
    return 0


def dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    argv_text = "secant " + shlex.join(argv)
    threads = torch.get_num_threads()
    try:
        return bench(args, argv_text) if args.command == "bench" else tune(args, argv_text)
    except BenchError as exc:
        print(f"secant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting as it was
