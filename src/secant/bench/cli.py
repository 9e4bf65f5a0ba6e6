"""``secant bench`` and ``secant tune``: argument parsing, validation and the run loops."""

from __future__ import annotations

import argparse
import datetime as dt
import math
import pprint
import shlex
import sys
from pathlib import Path

import torch

from secant.bench import distributed, report
from secant.bench.data import BenchError
from secant.bench.problems import PROBLEMS, get_problem
from secant.bench.registry import OPTIMIZERS, available_optimizers, get_optimizer
from secant.bench.runner import RunConfig, run_one
from secant.bench.tuned import TUNED

BENCH_EPILOG = """\
With no arguments: every available optimizer on the CURVES-like autoencoder, one seed, 50 s of
training time per run (single seed, 20 evaluations on 4,000 training / 2,000 test examples,
final evaluation on all 30,000), which finishes within 10 minutes on 2 CPU cores with all seven
optimizers. Learning rates come from the committed tuning table (secant tune), --lr overrides.
Outputs in --out: results.json, loss_vs_step.png, loss_vs_time.png, report.md, and with several
problems performance_profile.png and the geometric-mean speedup against Adam.
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problem", default="curves", metavar="NAME[,NAME...]",
                   help=f"problem(s), comma-separated: {', '.join(PROBLEMS)} (default curves)")
    p.add_argument("--optimizers", metavar="a,b,...",
                   help="optimizers, comma-separated (default: every available one; --list)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget-seconds", type=_positive_float, metavar="S",
                   help="training-time budget per run in seconds (default: the problem's, "
                   "50 s for curves)")
    g.add_argument("--epochs", type=_positive_float, metavar="E",
                   help="budget in epochs instead of seconds")
    p.add_argument("--seeds", type=_positive_int, default=1, metavar="N",
                   help="seeds 0..N-1 per optimizer (default 1)")
    p.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help="minibatch size (default: the problem's, 1000 for curves)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where to train (default cpu)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="local data: MNIST IDX files (mnist), CIFAR-10 binary batches (cifar10)")
    p.add_argument("--synthetic", action="store_true",
                   help="cifar10*: random CIFAR-shaped data (throughput only)")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                   help="torch CPU threads (default 1: on a shared CPU, more threads than free "
                   "cores make step times erratic; raise it on an idle machine)")
    p.add_argument("--evals", type=_positive_int, default=20, metavar="N",
                   help="evaluations per run on the fixed subsets (default 20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="compare optimizers: table, plots, report",
                       description="Run optimizers on benchmark problems and report which "
                       "reaches the target loss first, in steps and in wall-clock.",
                       epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--lr", type=_lr_override, action="append", default=[], metavar="OPT=VALUE",
                   help="learning-rate override, repeatable (e.g. --lr adam=3e-3)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: a new timestamped folder in ./bench-results/)")
    p.add_argument("--note", default="", help="free text stored in results.json and report.md")
    p.add_argument("--list", action="store_true",
                   help="list problems and optimizers with one-line descriptions, then exit")
    return p


def add_tune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("tune", help="learning-rate grid search; writes the tuning table",
                       description="For each optimizer, train with every learning rate of its "
                       "grid and keep the one with the lowest final training loss (median over "
                       "seeds). The problem's target is the training-subset loss that tuned "
                       "Adam reaches at the end of the budget.")
    _common(p)
    p.add_argument("--grid", action="append", default=[], metavar="OPT=LR:LR:...",
                   help="replace an optimizer's grid (default: the registry's)")
    p.add_argument("--write", metavar="PATH",
                   help="update this tuning table (a Python file like secant/bench/tuned.py)")
    p.add_argument("--markdown", metavar="PATH", help="append the results as Markdown here")
    return p


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _resolve(args: argparse.Namespace) -> tuple[list, list]:
    problems = [get_problem(n) for n in _split(args.problem)]
    if not problems:
        raise BenchError("--problem is empty; expected one or more of: " + ", ".join(PROBLEMS))
    names = _split(args.optimizers) if args.optimizers else available_optimizers()
    entries = [get_optimizer(n) for n in names]
    if not entries:
        raise BenchError("--optimizers is empty; expected names from: " + ", ".join(OPTIMIZERS))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available in this torch build; use cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return problems, entries


def _configs(args, problem, entry, lr, lr_source) -> list[RunConfig]:
    budget = None if args.epochs else (args.budget_seconds or problem.budget_seconds)
    return [RunConfig(problem.name, entry.name, lr, lr_source, seed,
                      args.batch_size or problem.batch_size, budget, args.epochs, args.device,
                      args.evals) for seed in range(args.seeds)]


def _list() -> str:
    lines = ["problems:"]
    for p in PROBLEMS.values():
        lines.append(f"  {p.name:<12} {p.description}")
    lines.append("optimizers:")
    for e in OPTIMIZERS.values():
        mark = "" if e.available else " [not available in this version]"
        lines.append(f"  {e.name:<12} {e.description}{mark}")
    return "\n".join(lines)


def _meta(args, argv_text: str) -> dict:
    return {"command": argv_text, "note": getattr(args, "note", ""),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "versions": report.versions(), "machine": report.machine_info(args.device),
            "config": {k: v for k, v in vars(args).items() if k not in ("command",)}}


def _problem_info(problem) -> dict:
    return {"description": problem.description, "target": problem.target,
            "target_note": problem.target_note, "notes": problem.notes,
            "batch_size": problem.batch_size, "default_budget_seconds": problem.budget_seconds}


def bench(args: argparse.Namespace, argv_text: str) -> int:
    if args.list:
        print(_list())
        return 0
    problems, entries = _resolve(args)
    rank, world = distributed.init(args.device)
    overrides = dict(args.lr)
    for name in overrides:
        if name not in [e.name for e in entries]:
            raise BenchError(f"--lr {name}=...: {name} is not among the optimizers being run "
                             f"({', '.join(e.name for e in entries)})")
    datasets = {p.name: p.load(args.data_dir, args.synthetic) for p in problems}
    out = Path(args.out) if args.out else (
        Path("bench-results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    meta = _meta(args, argv_text) | {"world_size": world}
    runs = []
    for p in problems:
        for e in entries:
            lr, src = (overrides[e.name], "override") if e.name in overrides else (
                e.lr_for(p.name), e.lr_source(p.name))
            for cfg in _configs(args, p, e, lr, src):
                runs.append(run_one(p, e, datasets[p.name], cfg,
                                    progress=not args.no_progress and rank == 0))
    if rank != 0:  # under torchrun, rank 0 reports
        return 0
    info = {p.name: _problem_info(p) for p in problems}
    summary = report.write_outputs(out, meta, info, runs)
    for p in problems:
        tgt = info[p.name]["target"]
        print(f"\n{p.name} (target {'none' if tgt is None else format(tgt, '.4g')})")
        print(report.text_table(report.table_rows(summary, p.name)))
    print(f"\nwrote {out}/ (results.json, report.md, plots)")
    return 0


def _parse_grid(items: list[str]) -> dict[str, list[float]]:
    grids = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in OPTIMIZERS:
            raise BenchError(f"--grid {item!r}: expected OPT=LR:LR:... with OPT one of "
                             f"{', '.join(OPTIMIZERS)}")
        try:
            grids[name] = [_positive_float(v) for v in values.split(":")]
        except argparse.ArgumentTypeError as exc:
            raise BenchError(f"--grid {item!r}: {exc}") from None
    return grids


def tune(args: argparse.Namespace, argv_text: str) -> int:
    problems, entries = _resolve(args)
    grids = _parse_grid(args.grid)
    table = {k: dict(v) for k, v in TUNED.items()}
    md = [f"## `{argv_text}`", "",
          f"{dt.datetime.now().isoformat(timespec='seconds')}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; "
          f"machine: {report.machine_info(args.device)['platform']}.", ""]
    for p in problems:
        data = p.load(args.data_dir, args.synthetic)
        md += [f"### {p.name}", "", "| optimizer | lr | final train loss (median over seeds) |"
               " status |", "|---|---|---|---|"]
        lrs = dict(table.get("lrs", {}).get(p.name, {}))
        grid_rec = dict(table.get("grids", {}).get(p.name, {}))
        adam_end = None
        for e in entries:
            if e.shape == "layer" and not p.layer_optimizers:
                continue
            results = []
            for lr in grids.get(e.name, e.grid):
                runs = [run_one(p, e, data, cfg, progress=not args.no_progress)
                        for cfg in _configs(args, p, e, lr, "grid")]
                finals = [r["final_train_loss"] if r["status"] == "ok" else math.inf
                          for r in runs]
                ends = [r["curve"][-1]["train_loss"] if r["status"] == "ok" else math.inf
                        for r in runs]
                med = sorted(finals)[len(finals) // 2]
                status = ",".join(sorted({r["status"] for r in runs}))
                results.append((med, lr, sorted(ends)[len(ends) // 2], status))
            best = min(results)
            for med, lr, _, status in results:
                mark = " **best**" if lr == best[1] and math.isfinite(med) else ""
                md.append(f"| {e.name} | {lr:g}{mark} | {med:.5g} | {status} |")
            if math.isfinite(best[0]):
                lrs[e.name] = best[1]
            grid_rec[e.name] = [[lr, (m if math.isfinite(m) else None)]
                                for m, lr, _, _ in results]
            if e.name == "adam" and math.isfinite(best[2]):
                adam_end = best[2]
            print(f"{p.name}/{e.name}: best lr {best[1]:g} (final train loss {best[0]:.5g})")
        table.setdefault("lrs", {})[p.name] = lrs
        table.setdefault("grids", {})[p.name] = grid_rec
        if adam_end is not None:
            budget = (f"{args.epochs} epochs" if args.epochs else
                      f"{args.budget_seconds or p.budget_seconds:g} s of training")
            table.setdefault("targets", {})[p.name] = {
                "loss": round(adam_end, 6),
                "how": f"training-subset loss that tuned Adam (lr {lrs['adam']:g}) reached at the "
                       f"end of {budget} at batch size {args.batch_size or p.batch_size} "
                       f"in `{argv_text}`"}
            md += ["", f"Target set: {table['targets'][p.name]['loss']:.6g} "
                   f"({table['targets'][p.name]['how']})."]
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
