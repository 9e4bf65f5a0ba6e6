"""Summaries, plots and the written outputs of a benchmark: ``results.json``,
``loss_vs_step.png``, ``loss_vs_time.png``, ``report.md`` (verdict table first, then the
detail tables) and, across several problems, ``performance_profile.png``
(``docs/bench.md``, Report)."""

from __future__ import annotations

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


def _med(values: list) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(vals)) if vals else None


def _range(values: list) -> dict | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return {"median": float(statistics.median(vals)), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def summarize(runs: list[dict], targets: dict[str, float | None]) -> dict:
    """``summary[problem][optimizer]``: status counts, medians and ranges over seeds. Sets each
    run's ``steps_to_target``, ``time_to_target`` (measured) and ``projected_time_to_target``
    (steps × median step time)."""
    out: dict[str, dict[str, dict]] = {}
    for r in runs:
        cfg = r["config"]
        out.setdefault(cfg["problem"], {}).setdefault(cfg["optimizer"], {"runs": []})
        out[cfg["problem"]][cfg["optimizer"]]["runs"].append(r)
    for prob, row in out.items():
        for cell in row.values():
            rs = cell.pop("runs")
            ok = [r for r in rs if r["status"] == "ok"]
            ttt = []
            for r in rs:
                t, s = (scoring.time_to_target(r["curve"], targets.get(prob))
                        if r["status"] == "ok" else (scoring.INF, -1))
                r["time_to_target"] = t if math.isfinite(t) else None
                r["steps_to_target"] = s if s >= 0 else None
                r["projected_time_to_target"] = scoring.projected_time(
                    r["steps_to_target"], r.get("median_step_time"))
                ttt.append((t, s))
            times = [t for t, _ in ttt]
            med_t = scoring.median_or_inf(times)
            steps = [float(s) if s >= 0 else scoring.INF for _, s in ttt]
            cell.update(
                lr=rs[0]["config"]["lr"], lr_source=rs[0]["config"]["lr_source"],
                seeds=len(rs), ok=len(ok),
                statuses=sorted({r["status"] for r in rs}),
                message=next((r["message"] for r in rs if r["message"]), ""),
                final_train_loss=_med([r.get("final_train_loss") for r in ok]),
                final_test_loss=_med([r.get("final_test_loss") for r in ok]),
                time_to_target=med_t if math.isfinite(med_t) else None,
                steps_to_target=(scoring.median_or_inf(steps)
                                 if math.isfinite(scoring.median_or_inf(steps)) else None),
                median_step_time=_med([r.get("median_step_time") for r in rs]),
                steps=_med([r.get("steps") for r in rs]),
                knob=rs[0]["config"].get("knob", {}),
                steps_to_target_range=_range([r["steps_to_target"] for r in rs]),
                projected_time_range=_range([r["projected_time_to_target"] for r in rs]),
                time_to_target_range=_range([r["time_to_target"] for r in rs]),
                final_train_loss_range=_range([r.get("final_train_loss") for r in ok]),
                reached=sum(r["steps_to_target"] is not None for r in rs),
                opt_state_bytes=max((r["opt_state_bytes"] for r in rs
                                     if r.get("opt_state_bytes") is not None), default=None),
            )
    return out


def _fmt(v: float | None, spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def _fmt_range(r: dict | None, spec: str, seeds: int) -> str:
    """``median [min–max]`` over the seeds that reached; ``— (k/n)`` marks missed seeds."""
    if r is None:
        return "—"
    text = format(r["median"], spec)
    if r["n"] > 1:
        text += f" [{format(r['min'], spec)}–{format(r['max'], spec)}]"
    if r["n"] < seeds:
        text += f" ({r['n']}/{seeds})"
    return text


def _hyper(c: dict) -> str:
    knob = "".join(f", {k} {v:.6g}" for k, v in c.get("knob", {}).items())
    return f"{c['lr']:.3g}{knob} ({c['lr_source']})"


def table_rows(summary: dict, problem: str) -> list[list[str]]:
    rows = []
    for opt, c in summary[problem].items():
        status = "ok" if c["ok"] == c["seeds"] else "/".join(c["statuses"])
        if c["seeds"] > 1:
            status += f" ({c['ok']}/{c['seeds']} ok)"
        n = c["seeds"]
        rows.append([
            opt, _hyper(c), status,
            _fmt_range(c["steps_to_target_range"], ".0f", n),
            _fmt_range(c["projected_time_range"], ".2f", n),
            _fmt_range(c["time_to_target_range"], ".2f", n),
            _fmt_range(c["final_train_loss_range"], ".4g", n),
            _fmt(c["final_test_loss"], ".4g"), _fmt(c["steps"], ".0f"),
            _fmt(None if c["median_step_time"] is None else 1e3 * c["median_step_time"], ".2f"),
            _fmt(None if c["opt_state_bytes"] is None else c["opt_state_bytes"] / 2**20, ".2f"),
        ])
    return rows


HEADER = ["optimizer", "lr, knob", "status", "steps to target", "time to target, projected (s)",
          "time to target, measured (s)", "final train loss", "final test loss", "steps",
          "median step (ms)", "opt. state (MiB)"]

VERDICT_HEADER = ["problem", "target", "first to target", "best secant: steps",
                  "best baseline: steps", "secant speedup in steps", "in time (projected)",
                  "holds on every seed"]


def _factor(f: dict | None) -> str:
    if f is None or f["median"] is None:
        return "—"
    if f["median"] == 0:
        return "0 (secant: not reached)"
    if f["median"] == math.inf:
        return "∞ (baseline: not reached)"

    def one(v):
        return "∞" if v == math.inf else format(v, ".2f")
    text = one(f["median"]) + "×"
    if f["min"] is not None and f["max"] is not None and f["min"] != f["max"]:
        text += f" [{one(f['min'])}–{one(f['max'])}]"
    return text


def _family_steps(v: dict, f: str) -> str:
    o, r = v.get(f"best_{f}"), v.get(f"{f}_steps")
    if o is None or r is None:
        return "—"
    if math.isinf(r["median"]):
        return f"{o}: not reached"
    rng = "" if r["min"] == r["max"] else \
        f" [{r['min']:.0f}–{'∞' if math.isinf(r['max']) else format(r['max'], '.0f')}]"
    return f"{o}: {r['median']:.0f}{rng}"


def verdict_rows(verdicts: dict, targets: dict) -> list[list[str]]:
    rows = []
    for prob, v in verdicts.items():
        if v is None:
            continue
        fs = v.get("factor_steps")
        every = "—" if "every_seed" not in v or fs is None or fs["median"] is None else (
            "yes: secant wins" if v["every_seed"] else
            "yes: baseline wins" if v["secant_loses_every_seed"] else "no (mixed)")
        rows.append([prob, _fmt(targets.get(prob), ".4g", "none"), v["first"] or "nobody",
                     _family_steps(v, "secant"), _family_steps(v, "baseline"), _factor(fs),
                     _factor(v.get("factor_time")), every])
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


def optimizer_colors(names: list[str]) -> dict:
    """One colour per optimizer, fixed by its place in the registry, so every plot of every
    report uses the same colour for the same optimizer."""
    import matplotlib

    from secant.bench.registry import OPTIMIZERS

    cmap = matplotlib.colormaps["tab20"]
    order = list(OPTIMIZERS) + sorted(n for n in names if n not in OPTIMIZERS)
    return {n: cmap((2 * order.index(n)) % 20 + (order.index(n) // 10) % 2) for n in names}


def robust_ylim(values: list[float], lo_pct: float = 2.0, hi_pct: float = 90.0,
                floor: float | None = None) -> tuple[float, float] | None:
    """A y-range from percentiles of the finite values, so one spike or a diverging run's
    tail does not squash the band where the runs differ; widened by 10 % (log scale)."""
    vals = np.array([v for v in values if math.isfinite(v) and v > 0])
    if floor is not None:
        vals = vals[vals >= floor * 0.5]
    if len(vals) == 0:
        return None
    lo, hi = np.percentile(vals, lo_pct), np.percentile(vals, hi_pct)
    if floor is not None:
        lo = min(lo, floor)
    if hi <= lo:
        hi = lo * 1.1 + 1e-12
    span = math.log(hi / lo)
    return lo * math.exp(-0.1 * span), hi * math.exp(0.1 * span)


def plot_curves(runs: list[dict], targets: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    problems = list(dict.fromkeys(r["config"]["problem"] for r in runs))
    opts = list(dict.fromkeys(r["config"]["optimizer"] for r in runs))
    colors = optimizer_colors(opts)
    names = []
    for key, xlabel, fname in (("step", "optimizer steps", "loss_vs_step.png"),
                               ("time", "training time (s)", "loss_vs_time.png")):
        fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 4.8),
                                 squeeze=False)
        for ax, prob in zip(axes[0], problems):
            handles, seen, ys = [], set(), []
            for r in runs:
                cfg = r["config"]
                if cfg["problem"] != prob or not r["curve"]:
                    continue
                o = cfg["optimizer"]
                xs = [p[key] for p in r["curve"]]
                tr = [p["train_loss"] for p in r["curve"]]
                ys += tr + [p["test_loss"] for p in r["curve"]]
                ax.plot(xs, tr, color=colors[o], lw=1.4)
                ax.plot(xs, [p["test_loss"] for p in r["curve"]], color=colors[o], ls=":",
                        lw=1.0, alpha=0.8)
                if r["status"] == "diverged":
                    last = next((p for p in reversed(r["curve"])
                                 if math.isfinite(p["train_loss"])), None)
                    if last is not None:
                        ax.plot([last[key]], [last["train_loss"]], marker="x", ms=9, mew=2,
                                color=colors[o], ls="none")
                if o not in seen:
                    seen.add(o)
                    tag = "" if r["status"] in ("ok", "not applicable") else f" ({r['status']})"
                    handles.append(Line2D([], [], color=colors[o], lw=1.6, label=o + tag))
            tgt = targets.get(prob)
            if tgt is not None:
                ax.axhline(tgt, color="k", ls="--", lw=0.9)
                handles.append(Line2D([], [], color="k", ls="--",
                                      label=f"target {tgt:.4g}"))
            handles += [Line2D([], [], color="grey", lw=1.4, label="train subset (solid)"),
                        Line2D([], [], color="grey", ls=":", label="test subset (dotted)"),
                        Line2D([], [], color="grey", marker="x", ls="none",
                               label="diverged: last point")]
            ax.set_yscale("log")
            lim = robust_ylim(ys, floor=tgt)
            if lim is not None:
                ax.set_ylim(*lim)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss")
            ax.set_title(prob)
            ax.grid(alpha=0.3, which="both")
            ax.legend(handles=handles, fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        names.append(fname)
    return names


def plot_profile(times: dict, out: Path, what: str = "steps") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = list(np.logspace(0, 1, 200))
    prof = scoring.performance_profile(times, taus)
    colors = optimizer_colors(list(prof))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for o, rho in prof.items():
        ax.step(taus, rho, where="post", label=o, color=colors[o])
    ax.set_xscale("log")
    ax.set_xlabel(f"τ ({what}-to-target ratio to the fastest optimizer)")
    ax.set_ylabel("fraction of problems with ratio ≤ τ")
    ax.set_title(f"Performance profile over {len(times)} problems ({what} to target, median "
                 "over seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "performance_profile.png", dpi=110)
    plt.close(fig)
    return "performance_profile.png"


def verdicts(runs: list[dict], summary: dict) -> dict:
    from secant.bench.registry import OPTIMIZERS

    fam = {o: e.family for o, e in OPTIMIZERS.items()}
    out = {}
    for prob, row in summary.items():
        by_opt = {o: [r for r in runs if r["config"]["problem"] == prob
                      and r["config"]["optimizer"] == o]
                  for o, c in row.items() if "not applicable" not in c["statuses"]}
        out[prob] = scoring.verdict(by_opt, fam)
    return out


def write_outputs(out: Path, meta: dict, problems_info: dict, runs: list[dict]
                  ) -> tuple[dict, dict]:
    """Score, plot and write everything; return the summary and the verdicts."""
    out.mkdir(parents=True, exist_ok=True)
    targets = {p: info["target"] for p, info in problems_info.items()}
    summary = summarize(runs, targets)
    verdict = verdicts(runs, summary)
    steps = {p: {o: (c["steps_to_target"] if c["steps_to_target"] is not None else scoring.INF)
                 for o, c in row.items() if "not applicable" not in c["statuses"]}
             for p, row in summary.items()}
    times = {p: {o: (c["time_to_target"] if c["time_to_target"] is not None else scoring.INF)
                 for o, c in row.items() if "not applicable" not in c["statuses"]}
             for p, row in summary.items()}
    multi = len(summary) > 1
    speedup = scoring.geomean_speedup(times) if multi else {}
    plots = plot_curves(runs, targets, out)
    if multi:
        plots.append(plot_profile(steps, out))
    if hasattr(os, "getloadavg"):
        meta["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results = {**meta, "problems": problems_info, "verdicts": verdict, "summary": summary,
               "geomean_speedup_vs_adam": {o: {"speedup": s, "problems": n}
                                           for o, (s, n) in speedup.items()},
               "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(meta, problems_info, summary, verdict,
                                                   speedup, plots))
    return summary, verdict


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
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    if "load_average_at_start" in m:
        lines += [f"Load average (1, 5, 15 min) at start {m['load_average_at_start']}, at end "
                  f"{m.get('load_average_at_end')}.", ""]
    lines += [
        "## Verdict", "",
        "Per problem: who reaches the target first (median steps over seeds), the best secant "
        "method and the best baseline with their steps to target (median [min–max] over "
        "seeds), and the secant method's speedup over the baseline (baseline / secant: > 1 "
        "means the secant method is faster), in steps and in projected time (steps × median "
        "step time), with its range over seeds (paired by seed). A win or a loss holds only "
        "when it holds on every seed.", "",
        md_table(verdict_rows(verdict, targets), VERDICT_HEADER), "",
        f"Budget: {budget}; {cfg['seeds']} seed(s). A run diverges when its loss is "
        "non-finite or above the problem's ceiling (1.5 × the initial loss during the first "
        "epoch, then 1.5 × the smaller of the initial and the trivial predictor's loss); it "
        "stops and never reaches the target. Time counts optimizer construction (with "
        "K-BFGS's warm start) and whole steps, not evaluations. Steps and time to target: "
        "first evaluation with training-subset loss ≤ target (— = not reached; (k/n): k of n "
        "seeds reached). Projected time = steps to target × median step time after warm-up; "
        "measured time is the clock, which machine load stretches.", "",
    ]
    for prob, row in summary.items():
        info = problems_info[prob]
        tgt = "none" if info["target"] is None else f"{info['target']:.4g}"
        lines += [f"## {prob}", "", info["description"] + ".", "",
                  f"Target training loss: {tgt} — {info['target_note']}", "",
                  md_table(table_rows(summary, prob)), ""]
        msgs = [(o, c["message"]) for o, c in row.items() if c["message"]]
        if msgs:
            lines += [f"- `{o}`: {msg}" for o, msg in msgs] + [""]
    if speedup:
        lines += ["## Across problems", "",
                  "Geometric-mean measured time-to-target speedup against Adam (over problems "
                  "where both reach the target):", "",
                  "| optimizer | speedup vs adam | problems |", "|---|---|---|"]
        lines += [f"| {o} | {_fmt(s, '.2f')} | {n} |" for o, (s, n) in speedup.items()]
        lines += [""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)
