"""The written outputs of a benchmark (``docs/bench.md``, Report): the summary over seeds,
``report.md`` (verdict table first, then the detail tables), strict ``results.json``, and the
plots (drawn by :mod:`secant.bench.plots`). Every number over seeds is
:func:`secant.bench.scoring.over_seeds`, written by one formatter (:func:`seeds_text`), so
the verdict and the tables cannot disagree. :func:`rerender` rewrites all of it from a
``results.json`` without training."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

import secant
from secant.bench import scoring
from secant.bench.scoring import MEASURED, PROJECTED, STEPS

FINAL_LOSSES = ("final_train_loss", "final_test_loss")
COMPUTED = ("problems", "verdicts", "summary", "geomean_speedup_vs_adam", "runs")


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    return {"secant": secant.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------------------- summary
def _median_present(values: list) -> float | None:
    """Median of the values a run measured (step time, steps done); ``None`` if none did."""
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


def summarize(runs: list[dict], targets: dict[str, float | None]) -> dict:
    """``summary[problem][optimizer]``: hyperparameters, status counts and, per measure (steps
    and projected and measured time to target, final train and test loss), the statistic over
    seeds (:func:`secant.bench.scoring.over_seeds`). Sets each run's ``steps_to_target``,
    ``time_to_target`` (measured) and ``projected_time_to_target`` (steps × median step
    time), ``None`` when not reached; a run that did not finish ``ok`` never reaches."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        cfg = r["config"]
        t, s = (scoring.time_to_target(r["curve"], targets.get(cfg["problem"]))
                if r["status"] == "ok" else (scoring.INF, -1))
        r[MEASURED] = t if math.isfinite(t) else None
        r[STEPS] = s if s >= 0 else None
        r[PROJECTED] = scoring.projected_time(r[STEPS], r.get("median_step_time"))
        grouped.setdefault(cfg["problem"], {}).setdefault(cfg["optimizer"], []).append(r)
    return {p: {o: _cell(rs) for o, rs in row.items()} for p, row in grouped.items()}


def _cell(rs: list[dict]) -> dict:
    cfg = rs[0]["config"]
    return {
        "lr": cfg["lr"], "lr_source": cfg["lr_source"], "knob": cfg.get("knob", {}),
        "seeds": len(rs), "ok": sum(r["status"] == "ok" for r in rs),
        "statuses": sorted({r["status"] for r in rs}),
        "message": next((r["message"] for r in rs if r["message"]), ""),
        **{k: scoring.over_seeds([r.get(k) for r in rs])
           for k in (STEPS, PROJECTED, MEASURED, *FINAL_LOSSES)},
        "median_step_time": _median_present([r.get("median_step_time") for r in rs]),
        "steps": _median_present([r.get("steps") for r in rs]),
        "opt_state_bytes": max((r["opt_state_bytes"] for r in rs
                                if r.get("opt_state_bytes") is not None), default=None),
    }


def verdicts(runs: list[dict], summary: dict) -> dict:
    """Per problem, :func:`secant.bench.scoring.verdict` over the optimizers that apply."""
    from secant.bench.registry import OPTIMIZERS

    fam = {o: e.family for o, e in OPTIMIZERS.items()}
    out = {}
    for prob, row in summary.items():
        by_opt = {o: [r for r in runs if r["config"]["problem"] == prob
                      and r["config"]["optimizer"] == o]
                  for o, c in row.items() if "not applicable" not in c["statuses"]}
        out[prob] = scoring.verdict(by_opt, fam)
    return out


def _medians(summary: dict, key: str) -> dict[str, dict[str, float]]:
    """``{problem: {optimizer: median of key over seeds}}`` over the optimizers that apply."""
    return {p: {o: c[key]["median"] for o, c in row.items()
                if "not applicable" not in c["statuses"]} for p, row in summary.items()}


# ------------------------------------------------------------------------------- text
def _num(v: float, spec: str) -> str:
    return "∞" if v == math.inf else format(v, spec)


def seeds_text(s: dict, spec: str, word: str = "reached") -> str:
    """The one way a statistic over seeds is written: ``median [min–max] (k/n reached)``;
    the range only when it has width, the count only when a seed has no value; ∞ in a range
    is a seed without one; a median of ∞ is written ``not reached`` (``word``: ``reached``
    for targets, ``finished`` for final losses), never 0."""
    if s["finite"] == 0:
        return f"not {word}" + (f" on any of {s['n']} seeds" if s["n"] > 1 else "")
    text = f"not {word}" if s["median"] == math.inf else format(s["median"], spec)
    if s["min"] != s["max"]:
        text += f" [{_num(s['min'], spec)}–{_num(s['max'], spec)}]"
    if s["finite"] < s["n"]:
        text += f" ({s['finite']}/{s['n']} {word})"
    return text


def _hyper(c: dict) -> str:
    knob = "".join(f", {k} {v:.6g}" for k, v in c.get("knob", {}).items())
    return f"{c['lr']:.3g}{knob} ({c['lr_source']})"


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


HEADER = ["optimizer", "lr, knob", "status", "steps to target", "time to target, projected (s)",
          "time to target, measured (s)", "final train loss", "final test loss", "steps",
          "median step (ms)", "opt. state (MiB)"]


def table_rows(summary: dict, problem: str) -> list[list[str]]:
    """The detail table of one problem, one row per optimizer (``HEADER``)."""
    rows = []
    for opt, c in summary[problem].items():
        status = "ok" if c["ok"] == c["seeds"] else "/".join(c["statuses"])
        if c["seeds"] > 1:
            status += f" ({c['ok']}/{c['seeds']} ok)"
        if c["statuses"] == ["not applicable"]:
            stats = ["—"] * 5
        else:
            stats = [seeds_text(c[k], spec) for k, spec in
                     ((STEPS, ".0f"), (PROJECTED, ".2f"), (MEASURED, ".2f"))]
            stats += [seeds_text(c[k], ".4g", "finished") for k in FINAL_LOSSES]
        rows.append([
            opt, _hyper(c), status, *stats, _fmt(c["steps"], ".0f"),
            _fmt(None if c["median_step_time"] is None else 1e3 * c["median_step_time"], ".2f"),
            _fmt(None if c["opt_state_bytes"] is None else c["opt_state_bytes"] / 2**20, ".2f"),
        ])
    return rows


VERDICT_HEADER = ["problem", "target", "first to target", "best secant: steps to target",
                  "best baseline: steps to target", "secant speedup in steps",
                  "in time (projected)", "holds on every seed"]

_NO_RATIO = {0.0: "secant not reached", math.inf: "baseline not reached",
             None: "neither reached"}


def _ratio_text(r: float | None) -> str:
    return _NO_RATIO[r] if r in _NO_RATIO else f"{r:.2f}×"


def factor_text(f: dict) -> str:
    """``median×`` (the ratio of the two medians shown) with its per-seed range, or, when a
    seed has no ratio (one side or both did not reach), every seed's ratio spelled out."""
    text = _ratio_text(f["median"])
    if all(r not in _NO_RATIO for r in f["per_seed"]):
        if f["min"] != f["max"]:
            text += f" [{f['min']:.2f}–{f['max']:.2f}]"
    elif any(_ratio_text(r) != text for r in f["per_seed"]):
        text += " (per seed: " + ", ".join(_ratio_text(r) for r in f["per_seed"]) + ")"
    return text


_HOLDS = {"secant": "yes, secant faster", "baseline": "yes, baseline faster", None: "no (mixed)"}


def holds_text(v: dict) -> str:
    """Whether the verdict holds on every seed, in steps and in projected time, each from the
    same per-seed comparison as the range beside it."""
    steps, time = v["factor_steps"]["every_seed"], v["factor_time"]["every_seed"]
    if steps == time:
        return f"{_HOLDS[steps]}, in steps and in time"
    return f"steps: {_HOLDS[steps]}; time: {_HOLDS[time]}"


def verdict_rows(verdicts: dict, targets: dict) -> list[list[str]]:
    """The verdict table (``VERDICT_HEADER``), one row per problem."""
    rows = []
    for prob, v in verdicts.items():
        if v is None:
            continue
        fam = [f"{v[f'best_{f}']}: {seeds_text(v[f'{f}_steps'], '.0f')}"
               if v[f"best_{f}"] is not None else f"no {f} run" for f in ("secant", "baseline")]
        compared = "factor_steps" in v
        rows.append([prob, "none" if targets.get(prob) is None else f"{targets[prob]:.4g}",
                     v["first"] or "nobody", *fam,
                     factor_text(v["factor_steps"]) if compared else "—",
                     factor_text(v["factor_time"]) if compared else "—",
                     holds_text(v) if compared else "—"])
    return rows


def text_table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def md_table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------ strict JSON
_NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _encode(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def strict_json(obj) -> str:
    """``obj`` as strict JSON: a non-finite number becomes the string ``"Infinity"``,
    ``"-Infinity"`` or ``"NaN"`` (what ``float()`` in Python and ``Number()`` in JavaScript
    read back); anything else that is not JSON becomes its ``str``."""
    return json.dumps(_encode(obj), indent=1, allow_nan=False) + "\n"


def _decode(v):
    if isinstance(v, str):
        return _NON_FINITE.get(v, v)
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def load_results(path: Path) -> dict:
    """A ``results.json`` with its non-finite numbers read back as floats (also those of an
    older file, written with bare ``Infinity``)."""
    return _decode(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------- outputs
def write_outputs(out: Path, meta: dict, problems_info: dict, runs: list[dict]
                  ) -> tuple[dict, dict]:
    """Record the load average at the end, then score, plot and write everything; return
    the summary and the verdicts."""
    if hasattr(os, "getloadavg"):
        meta["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return _write(out, meta, problems_info, runs)


def rerender(folder: Path) -> None:
    """Rewrite ``results.json``, ``report.md`` and the plots in ``folder`` from the runs its
    ``results.json`` holds (no training); the report says when and by what."""
    folder = Path(folder)
    data = load_results(folder / "results.json")
    meta = {k: v for k, v in data.items() if k not in COMPUTED}
    meta["rerendered"] = (f"{dt.datetime.now().isoformat(timespec='seconds')} by "
                          f"secant {secant.__version__} (secant.bench.report.rerender)")
    _write(folder, meta, data["problems"], data["runs"])


def _write(out: Path, meta: dict, problems_info: dict, runs: list[dict]) -> tuple[dict, dict]:
    from secant.bench import plots  # matplotlib (the bench extra) only where plots are drawn

    out.mkdir(parents=True, exist_ok=True)
    targets = {p: info["target"] for p, info in problems_info.items()}
    summary = summarize(runs, targets)
    verdict = verdicts(runs, summary)
    speedup = scoring.geomean_speedup(_medians(summary, PROJECTED)) if len(summary) > 1 else {}
    names = plots.write_plots(runs, targets, _medians(summary, STEPS), out)
    results = {**meta, "problems": problems_info, "verdicts": verdict, "summary": summary,
               "geomean_speedup_vs_adam": {o: {"speedup": s, "problems": n}
                                           for o, (s, n) in speedup.items()},
               "runs": runs}
    (out / "results.json").write_text(strict_json(results))
    (out / "report.md").write_text(render_markdown(meta, problems_info, summary, verdict,
                                                   speedup, names))
    return summary, verdict


def _across_problems(speedup: dict) -> list[str]:
    """The geometric-mean speedup table, or one sentence when no optimizer has a value."""
    rows = [(o, s, n) for o, (s, n) in speedup.items() if s is not None]
    lines = ["## Across problems", ""]
    if not rows:
        return lines + ["No geometric-mean speedup against Adam: on no problem do Adam and "
                        "another optimizer both reach the target (median over seeds), so the "
                        "table is left out.", ""]
    lines += ["Geometric-mean projected time-to-target speedup against Adam, over the problems "
              "where both reach the target (median over seeds); optimizers with no such "
              "problem are left out.", "",
              "| optimizer | speedup vs adam | problems |", "|---|---|---|"]
    return lines + [f"| {o} | {s:.2f} | {n} |" for o, s, n in rows] + [""]


STATISTICS_NOTE = (
    "Every number over seeds (verdict, tables and plots) is one statistic: the median over "
    "seeds, a seed without a value (target not reached; a final loss of a run that diverged "
    "or failed) counted as ∞, so the median is \"not reached\" when half of the seeds or more "
    "miss; [min–max] over all seeds, ∞ marking a seed without a value; (k/n reached) when only "
    "k of n seeds have one.")


def equal_cost_lines(ec: dict | None) -> list[str]:
    """The equal-cost budget of a problem (``bench --equal-cost``), or nothing."""
    if not ec:
        return []
    ref, cost = ec["reference"], ec["cost_per_step"]
    per = ", ".join(f"{o} {1e3 * c:.3g} ms ({cost[ref] / c:.2f}×) → {ec['steps'][o]} steps"
                    for o, c in cost.items())
    return [f"Equal-cost budget: every optimizer gets the cost of {ec['reference_steps']} "
            f"steps of {ref}. Cost per step, calibrated before the runs (process CPU time, "
            f"contenders interleaved in rounds, median), relative speed to {ref}, and the "
            f"steps that buys: {per}. Final losses below are at equal cost.", ""]


def render_markdown(meta: dict, problems_info: dict, summary: dict, verdict: dict,
                    speedup: dict, plots: list[str]) -> str:
    m = meta["machine"]
    cfg = meta["config"]
    if cfg.get("epochs") is not None:
        budget = f"{cfg['epochs']:g} epochs per run"
    elif cfg.get("budget_seconds") is not None:
        budget = f"{cfg['budget_seconds']:g} s of training time per run"
    else:
        budget = "per run, the problem's budget: " + ", ".join(
            f"{p} {info['budget_epochs']:g} epochs" for p, info in problems_info.items())
    targets = {p: info["target"] for p, info in problems_info.items()}
    lines = [
        "# secant bench report", "",
        f"Command: `{meta['command']}`", "",
        f"secant {meta['versions']['secant']}, torch {meta['versions']['torch']}, "
        f"Python {meta['versions']['python']}; {m['platform']}, {m['cpu_count']} CPUs, "
        f"{m['torch_threads']} torch threads, device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "") + f"; started {meta['started']}"
        + (f", wall time {meta['wall_seconds']:.0f} s" if "wall_seconds" in meta else "")
        + ".", "",
    ]
    if meta.get("rerendered"):
        lines += [f"Tables, verdict and plots re-rendered from the runs in `results.json` on "
                  f"{meta['rerendered']}; no run was repeated.", ""]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    if "load_average_at_start" in m:
        lines += [f"Load average (1, 5, 15 min) at start {m['load_average_at_start']}, at end "
                  f"{m.get('load_average_at_end')}.", ""]
    lines += [
        "## Verdict", "",
        "Per problem: who reaches the target first (median steps over seeds), the best secant "
        "method and the best baseline with their steps to target (as in the tables below), "
        "and the secant method's speedup over the baseline (baseline / secant: > 1 means the "
        "secant method is faster) in steps and in projected time (steps × median step time): "
        "the ratio of the two medians, with the range of the ratios paired by seed, or every "
        "seed's ratio when one or both did not reach the target on a seed. \"Holds on every "
        "seed\" is read from those same per-seed comparisons: the secant method is faster on "
        "every seed, or the baseline is faster on every seed where either reaches the target; "
        "otherwise mixed. Only a win that holds on every seed is claimed.", "",
        STATISTICS_NOTE, "",
        md_table(verdict_rows(verdict, targets), VERDICT_HEADER), "",
        f"Budget: {budget}; {cfg['seeds']} seed(s). A run diverges when its loss is "
        "non-finite or above the problem's ceiling (1.5 × the initial loss during the first "
        "epoch, then 1.5 × the smaller of the initial and the trivial predictor's loss); it "
        "stops and never reaches the target. Time counts optimizer construction (with "
        "K-BFGS's warm start) and whole steps, not evaluations. Steps and time to target: "
        "first evaluation with training-subset loss ≤ target. Projected time = steps to "
        "target × median step time after warm-up; measured time is the clock, which machine "
        "load stretches.", "",
    ]
    for prob, row in summary.items():
        info = problems_info[prob]
        tgt = "none" if info["target"] is None else f"{info['target']:.4g}"
        lines += [f"## {prob}", "", info["description"] + ".", "",
                  f"Target training loss: {tgt} — {info['target_note']}", "",
                  *equal_cost_lines(info.get("equal_cost")),
                  md_table(table_rows(summary, prob)), ""]
        msgs = [(o, c["message"]) for o, c in row.items() if c["message"]]
        if msgs:
            lines += [f"- `{o}`: {msg}" for o, msg in msgs] + [""]
    if speedup:
        lines += _across_problems(speedup)
    lines += ["## Plots", "",
              "Per optimizer, at each evaluation: the median over seeds (line; a diverged run "
              "counts as ∞ from its stop on, as in the tables) and the min–max over the seeds "
              "still running (band). A cross marks a diverged run's last evaluation, at the top "
              "edge with its loss written beside it when that loss is above the plotted range. "
              "Training subset above (the target dashed), test subset below.", ""]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)
