"""The plots of a benchmark (``docs/bench.md``, Report): loss against steps and against time
(``loss_vs_step.png``, ``loss_vs_time.png``) and, across several problems, the performance
profile of steps to target (``performance_profile.png``).

Each optimizer is one median line over seeds with a min–max band
(:func:`secant.bench.scoring.curve_over_seeds`), in a colour, line style and marker of its own,
fixed by its place in the registry across every plot; the legend sits outside the axes; a
diverged run is a cross at its last evaluation, drawn at the top edge with its loss written
beside it when that loss is above the plotted range."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from secant.bench import scoring
from secant.bench.registry import OPTIMIZERS

LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h")
SUBSETS = (("train_loss", "training subset"), ("test_loss", "test subset"))
EDGE = 0.97  # where a cross outside the y-range is drawn, in axes fraction


def optimizer_styles(names: list[str]) -> dict[str, dict]:
    """``{name: {"color", "ls", "marker"}}``, fixed by the optimizer's place in the registry
    (names it does not know follow, sorted), so every plot of every report draws an optimizer
    the same way and neighbours in the registry (K-BFGS, K-BFGS(L)) differ in all three."""
    cmap = matplotlib.colormaps["tab20"]
    order = list(OPTIMIZERS) + sorted(n for n in names if n not in OPTIMIZERS)
    styles = {}
    for n in names:
        i = order.index(n)
        styles[n] = {"color": cmap((2 * i) % 20 + (i // 10) % 2),
                     "ls": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}
    return styles


def robust_ylim(values: list[float], lo_pct: float = 2.0, hi_pct: float = 90.0,
                floor: float | None = None) -> tuple[float, float] | None:
    """A y-range from percentiles of the finite values, so one spike or a diverging run's
    tail does not squash the band where the runs differ; widened by 10 % (log scale) and
    extended down to ``floor`` (the target)."""
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


def _axes_fraction(ax, y: float) -> float:
    """Height of ``y`` on the log y-axis in axes fraction, kept inside [1 − EDGE, EDGE]
    (a non-finite loss goes to the top edge)."""
    lo, hi = ax.get_ylim()
    if not math.isfinite(y) or y <= 0:
        return EDGE
    return min(max(math.log(y / lo) / math.log(hi / lo), 1 - EDGE), EDGE)


def _mark_diverged(ax, name: str, runs: list[dict], x_key: str, y_key: str, style: dict
                   ) -> None:
    """A cross at each diverged run's last evaluation (at the edge when outside the y-range),
    and one note per optimizer: how many seeds diverged, and the loss when it is outside the
    range (↑ above, ↓ below)."""
    diverged = [r for r in runs if r["status"] == "diverged" and r["curve"]]
    at = blended_transform_factory(ax.transData, ax.transAxes)
    lo, hi = ax.get_ylim()
    for r in diverged:
        last = r["curve"][-1]
        ax.plot([last[x_key]], [_axes_fraction(ax, last[y_key])], transform=at, marker="x",
                ms=9, mew=2.5, color=style["color"], ls="none", zorder=5)
    if diverged:
        last = diverged[0]["curve"][-1]
        y = last[y_key]
        note = f"{name} diverged ({len(diverged)}/{len(runs)})"
        if not math.isfinite(y):
            note += ": loss non-finite ↑"
        elif not lo <= y <= hi:
            note += f": loss {y:.4g} {'↓' if y < lo else '↑'}"
        ax.annotate(note, (last[x_key], _axes_fraction(ax, y)), xycoords=at,
                    xytext=(8, -6), textcoords="offset points", va="top", fontsize=7,
                    color="k", zorder=6, bbox={"boxstyle": "round,pad=0.2", "fc": "white",
                                               "ec": style["color"], "alpha": 0.9})


def _panel(ax, runs: list[dict], x_key: str, y_key: str, styles: dict,
           target: float | None) -> None:
    """One problem and one subset: a median line and a min–max band per optimizer."""
    by_opt: dict[str, list[dict]] = {}
    for r in runs:
        if r["status"] != "not applicable":
            by_opt.setdefault(r["config"]["optimizer"], []).append(r)
    ax.set_yscale("log")
    lim = robust_ylim([p[y_key] for r in runs for p in r["curve"]], floor=target)
    if lim is not None:
        ax.set_ylim(*lim)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=0.9)
    for i, (name, rs) in enumerate(by_opt.items()):
        xs, med, lo, hi = (np.array(v) for v in scoring.curve_over_seeds(rs, x_key, y_key))
        if len(xs) == 0:
            continue
        st = styles[name]
        ax.fill_between(xs, lo, hi, color=st["color"], alpha=0.15, lw=0)
        every = max(1, len(xs) // 6)
        ax.plot(xs, np.where(np.isfinite(med), med, np.nan), color=st["color"], ls=st["ls"],
                marker=st["marker"], ms=5, markevery=(i % every, every), lw=1.5, label=name)
        _mark_diverged(ax, name, rs, x_key, y_key, st)
    ax.grid(alpha=0.3, which="both")


def _legend(fig: Figure, styles: dict, extra: list) -> None:
    handles = [Line2D([], [], color=s["color"], ls=s["ls"], marker=s["marker"], ms=5, lw=1.5,
                      label=n) for n, s in styles.items()]
    fig.legend(handles=handles + extra, loc="outside right upper", fontsize=8)


def curve_figure(runs: list[dict], targets: dict[str, float | None], x_key: str) -> Figure:
    """Loss against ``x_key`` (``"step"`` or ``"time"``): one column per problem, the
    training subset (with the target, dashed) above the test subset."""
    problems = list(dict.fromkeys(r["config"]["problem"] for r in runs))
    styles = optimizer_styles(list(dict.fromkeys(r["config"]["optimizer"] for r in runs)))
    fig = Figure(figsize=(5.2 * len(problems) + 2.2, 8.0), layout="constrained")
    axes = fig.subplots(2, len(problems), squeeze=False)
    for col, prob in enumerate(problems):
        for row, (y_key, subset) in enumerate(SUBSETS):
            ax = axes[row][col]
            tgt = targets.get(prob) if y_key == "train_loss" else None
            _panel(ax, [r for r in runs if r["config"]["problem"] == prob], x_key, y_key,
                   styles, tgt)
            ax.set_title(f"{prob}: {subset}" + ("" if tgt is None else f", target {tgt:.4g}"),
                         fontsize=10)
            ax.set_xlabel("optimizer steps" if x_key == "step" else "training time (s)")
            ax.set_ylabel("loss")
    _legend(fig, styles, [
        Patch(color="grey", alpha=0.3, label="min–max over seeds"),
        Line2D([], [], color="k", ls="--", lw=0.9, label="target"),
        Line2D([], [], color="grey", marker="x", mew=2, ls="none",
               label="diverged: last evaluation\n(at the top edge when above)")])
    return fig


def profile_figure(steps: dict[str, dict[str, float]]) -> Figure:
    """Performance profile (Dolan & Moré) of ``steps[problem][optimizer]`` (median steps to
    target over seeds, ``inf`` when not reached); each label counts the problems where the
    optimizer's median reaches the target."""
    taus = list(np.logspace(0, 1, 200))
    prof = scoring.performance_profile(steps, taus)
    names = list(dict.fromkeys(o for row in steps.values() for o in row))
    styles = optimizer_styles(names)
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, name in enumerate(names):
        st = styles[name]
        ax.step(taus, prof[name], where="post", color=st["color"], ls=st["ls"],
                marker=st["marker"], ms=4, markevery=(7 * i % 40, 40), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("τ (steps-to-target ratio to the fastest optimizer)")
    ax.set_ylabel("fraction of problems with ratio ≤ τ")
    ax.set_title(f"Performance profile over {len(steps)} problems (steps to target, median "
                 "over seeds)", fontsize=10)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    reached = {n: sum(math.isfinite(row.get(n, math.inf)) for row in steps.values())
               for n in names}
    labelled = {f"{n} (reaches on {reached[n]}/{len(steps)})": s for n, s in styles.items()}
    _legend(fig, labelled, [])
    return fig


def write_plots(runs: list[dict], targets: dict[str, float | None],
                steps: dict[str, dict[str, float]], out: Path) -> list[str]:
    """Write the loss plots and, with several problems, the performance profile of ``steps``;
    return the file names."""
    figures = {"loss_vs_step.png": curve_figure(runs, targets, "step"),
               "loss_vs_time.png": curve_figure(runs, targets, "time")}
    if len(steps) > 1:
        figures["performance_profile.png"] = profile_figure(steps)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
    return list(figures)
