"""Summaries, plots and the written outputs of a benchmark: ``results.json``,
``loss_vs_step.png``, ``loss_vs_time.png``, ``report.md`` and, across several problems,
``performance_profile.png``."""

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
        info["load_average_at_start"] = list(os.getloadavg())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    return {"secant": secant.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _med(values: list) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(vals)) if vals else None


def summarize(runs: list[dict], targets: dict[str, float | None]) -> dict:
    """``summary[problem][optimizer]``: status counts and medians over seeds."""
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
                opt_state_bytes=max((r["opt_state_bytes"] for r in rs
                                     if r.get("opt_state_bytes") is not None), default=None),
            )
    return out


def _fmt(v: float | None, spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def table_rows(summary: dict, problem: str) -> list[list[str]]:
    rows = []
    for opt, c in summary[problem].items():
        status = "ok" if c["ok"] == c["seeds"] else "/".join(c["statuses"])
        if c["seeds"] > 1:
            status += f" ({c['ok']}/{c['seeds']} ok)"
        rows.append([
            opt, f"{c['lr']:.3g} ({c['lr_source']})", status,
            _fmt(c["final_train_loss"], ".4g"), _fmt(c["final_test_loss"], ".4g"),
            _fmt(c["time_to_target"], ".1f"), _fmt(c["steps_to_target"], ".0f"),
            _fmt(c["steps"], ".0f"),
            _fmt(None if c["median_step_time"] is None else 1e3 * c["median_step_time"], ".1f"),
            _fmt(None if c["opt_state_bytes"] is None else c["opt_state_bytes"] / 2**20, ".2f"),
        ])
    return rows


HEADER = ["optimizer", "lr", "status", "final train loss", "final test loss",
          "time to target (s)", "steps to target", "steps", "median step (ms)",
          "opt. state (MiB)"]


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


def plot_curves(runs: list[dict], targets: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["config"]["problem"] for r in runs))
    opts = list(dict.fromkeys(r["config"]["optimizer"] for r in runs))
    colors = {o: plt.get_cmap("tab10")(i % 10) for i, o in enumerate(opts)}
    names = []
    for key, xlabel, fname in (("step", "optimizer steps", "loss_vs_step.png"),
                               ("time", "training time (s)", "loss_vs_time.png")):
        fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 4.5),
                                 squeeze=False)
        for ax, prob in zip(axes[0], problems):
            labelled = set()
            for r in runs:
                cfg = r["config"]
                if cfg["problem"] != prob or not r["curve"]:
                    continue
                o = cfg["optimizer"]
                xs = [p[key] for p in r["curve"]]
                label = None if o in labelled else o + ("" if r["status"] == "ok"
                                                        else f" ({r['status']})")
                labelled.add(o)
                ax.plot(xs, [p["train_loss"] for p in r["curve"]], color=colors[o], label=label)
                ax.plot(xs, [p["test_loss"] for p in r["curve"]], color=colors[o], ls=":",
                        lw=1)
            if targets.get(prob) is not None:
                ax.axhline(targets[prob], color="k", ls="--", lw=0.8, label="target")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss (solid: train subset, dotted: test subset)")
            ax.set_title(prob)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        names.append(fname)
    return names


def plot_profile(times: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = list(np.logspace(0, 1, 200))
    prof = scoring.performance_profile(times, taus)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for o, rho in prof.items():
        ax.step(taus, rho, where="post", label=o)
    ax.set_xscale("log")
    ax.set_xlabel("τ (time-to-target ratio to the fastest optimizer)")
    ax.set_ylabel("fraction of problems with ratio ≤ τ")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "performance_profile.png", dpi=110)
    plt.close(fig)
    return "performance_profile.png"


def write_outputs(out: Path, meta: dict, problems_info: dict, runs: list[dict]) -> dict:
    """Score, plot and write everything; return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    targets = {p: info["target"] for p, info in problems_info.items()}
    summary = summarize(runs, targets)
    times = {p: {o: (c["time_to_target"] if c["time_to_target"] is not None else scoring.INF)
                 for o, c in row.items() if "not applicable" not in c["statuses"]}
             for p, row in summary.items()}
    multi = len(summary) > 1
    speedup = scoring.geomean_speedup(times) if multi else {}
    plots = plot_curves(runs, targets, out)
    if multi:
        plots.append(plot_profile(times, out))
    if hasattr(os, "getloadavg"):
        meta["machine"]["load_average_at_end"] = list(os.getloadavg())
    results = {**meta, "problems": problems_info, "summary": summary,
               "geomean_speedup_vs_adam": {o: {"speedup": s, "problems": n}
                                           for o, (s, n) in speedup.items()},
               "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(meta, problems_info, summary, speedup, plots))
    return summary


def render_markdown(meta: dict, problems_info: dict, summary: dict, speedup: dict,
                    plots: list[str]) -> str:
    m = meta["machine"]
    cfg = meta["config"]
    if cfg.get("epochs") is not None:
        budget = f"{cfg['epochs']} epochs per run"
    elif cfg.get("budget_seconds") is not None:
        budget = f"{cfg['budget_seconds']:g} s of training time per run"
    else:
        budget = "training time per run: " + ", ".join(
            f"{p} {info['default_budget_seconds']:g} s" for p, info in problems_info.items())
    lines = [
        "# secant bench report", "",
        f"Command: `{meta['command']}`", "",
        f"secant {meta['versions']['secant']}, torch {meta['versions']['torch']}, "
        f"Python {meta['versions']['python']}; {m['platform']}, {m['cpu_count']} CPUs, "
        f"{m['torch_threads']} torch threads, device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "") + f"; started {meta['started']}.", "",
    ]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    if "load_average_at_start" in m:
        lines += [f"Load average (1, 5, 15 min) at start {m['load_average_at_start']}, at end "
                  f"{m.get('load_average_at_end')}.", ""]
    lines += [
        f"Budget: {budget}; {meta['config']['seeds']} seed(s). Time counts optimizer "
        "construction and whole steps (forward, backward, update), not evaluations. Losses "
        "are evaluated on a fixed subset of the training set and of the test set during the "
        "run, and on the whole sets at the end ('final'). Time and steps to target: first "
        "evaluation with training-subset loss ≤ target (— = not reached). Opt. state: bytes "
        "of the tensors in `optimizer.state_dict()['state']` at the end of the run.", "",
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
                  "Geometric-mean time-to-target speedup against Adam (over problems where "
                  "both reach the target):", "",
                  "| optimizer | speedup vs adam | problems |", "|---|---|---|"]
        lines += [f"| {o} | {_fmt(s, '.2f')} | {n} |" for o, (s, n) in speedup.items()]
        lines += [""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)
