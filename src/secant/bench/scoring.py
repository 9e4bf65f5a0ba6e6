"""Scoring, after AlgoPerf (Dahl et al. 2023): time-to-target per run, performance profiles
across problems, and the geometric-mean time-to-target speedup against a baseline.

* time-to-target of one run: the training time (and step count) at the first evaluation whose
  training loss is at or below the target; ``inf`` if it never gets there.
* across seeds: the median of the per-seed times (``inf`` counts as the largest value, so the
  median is ``inf`` when at least half of the seeds miss the target).
* performance ratio ``r[p][o] = t[p][o] / min_o' t[p][o']`` (``inf`` when ``o`` misses the
  target or nobody reaches it); profile ``ρ_o(τ) = |{p : r[p][o] ≤ τ}| / |P|``.
* speedup of ``o`` against ``base`` = ``exp(mean_p log(t[p][base] / t[p][o]))`` over the
  problems where both reach the target; ``None`` when there is no such problem.
"""

from __future__ import annotations

import math
import statistics

INF = math.inf


def time_to_target(curve: list[dict], target: float | None) -> tuple[float, int]:
    """``(time, step)`` of the first curve point with ``train_loss <= target``, else
    ``(inf, -1)``."""
    if target is None:
        return INF, -1
    for point in curve:
        if point["train_loss"] <= target:
            return float(point["time"]), int(point["step"])
    return INF, -1


def median_or_inf(values: list[float]) -> float:
    """Median where ``inf`` is an ordinary (largest) value; ``inf`` for an empty list."""
    if not values:
        return INF
    return float(statistics.median(sorted(values)))


def performance_ratios(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``times[problem][optimizer]`` → ``ratios[problem][optimizer]``."""
    ratios: dict[str, dict[str, float]] = {}
    for prob, row in times.items():
        best = min(row.values(), default=INF)
        ratios[prob] = {o: (t / best if math.isfinite(t) and math.isfinite(best) and best > 0
                            else (1.0 if t == best == 0 else INF)) for o, t in row.items()}
    return ratios


def performance_profile(times: dict[str, dict[str, float]], taus: list[float]
                        ) -> dict[str, list[float]]:
    """``ρ_o(τ)`` for each optimizer at each ``τ`` in ``taus`` (fraction of problems)."""
    ratios = performance_ratios(times)
    opts = sorted({o for row in times.values() for o in row})
    n = len(times)
    return {o: [sum(1 for p in ratios if ratios[p].get(o, INF) <= tau) / n for tau in taus]
            for o in opts}


def geomean_speedup(times: dict[str, dict[str, float]], base: str = "adam"
                    ) -> dict[str, tuple[float | None, int]]:
    """Per optimizer: (geometric-mean speedup against ``base``, number of problems used)."""
    opts = sorted({o for row in times.values() for o in row})
    out: dict[str, tuple[float | None, int]] = {}
    for o in opts:
        logs = [math.log(row[base] / row[o]) for row in times.values()
                if base in row and o in row and math.isfinite(row[base]) and math.isfinite(row[o])
                and row[o] > 0 and row[base] > 0]
        out[o] = (math.exp(sum(logs) / len(logs)) if logs else None, len(logs))
    return out


# ---------------------------------------------------------------------------------- steps
def steps_to_target(curve: list[dict], target: float | None) -> int | None:
    """Step of the first evaluation with ``train_loss <= target``; ``None`` if never."""
    _, step = time_to_target(curve, target)
    return step if step >= 0 else None


def projected_time(steps: int | None, median_step_time: float | None) -> float | None:
    """Steps-to-target × median step time: a time-to-target that machine load can stretch but
    not reorder (both runs' step times are measured in the same conditions)."""
    if steps is None or median_step_time is None:
        return None
    return steps * median_step_time


def target_from_reference(finals: dict[str, list[float]]) -> tuple[float, str] | None:
    """The target rule: the loss the best tuned baseline reaches (at 3/4 of the budget, see
    :func:`secant.bench.tuning.target_loss`), median over seeds. ``finals[baseline]`` holds
    its training-subset losses there (``inf`` for a diverged seed); the best baseline is the
    one with the lowest median.
    Returns ``(target, baseline)``, or ``None`` when no baseline finished."""
    med = {b: median_or_inf(v) for b, v in finals.items() if v}
    if not med:
        return None
    best = min(med, key=lambda b: med[b])
    return (med[best], best) if math.isfinite(med[best]) else None


def _per_seed(runs: list[dict], key: str) -> dict[int, float]:
    return {r["config"]["seed"]: (INF if r.get(key) is None else float(r[key])) for r in runs}


def verdict(runs_by_opt: dict[str, list[dict]], families: dict[str, str]) -> dict | None:
    """Who reaches the target first, in steps, and by what factor the best secant method
    beats (> 1) or trails (< 1) the best baseline.

    ``runs_by_opt[o]`` are o's runs with ``steps_to_target`` and ``projected_time_to_target``
    set (``None`` = missed or diverged). The best of a family is the one with the lowest
    median steps (ties: most seeds reaching the target, then lowest median projected time,
    then lowest median final training loss). The factor's range is over seeds,
    paired by seed; ``every_seed`` is True when the best secant method reaches the target in
    fewer steps than the best baseline on every seed (``False`` when it loses on any)."""
    def key(o: str) -> tuple[float, int, float, float]:
        steps = list(_per_seed(runs_by_opt[o], "steps_to_target").values())
        return (median_or_inf(steps), -sum(math.isfinite(s) for s in steps),
                median_or_inf(list(_per_seed(runs_by_opt[o],
                                             "projected_time_to_target").values())),
                median_or_inf(list(_per_seed(runs_by_opt[o], "final_train_loss").values())))

    ranked = sorted(runs_by_opt, key=key)
    if not ranked:
        return None
    best = {f: next((o for o in ranked if families.get(o) == f), None)
            for f in ("baseline", "secant")}
    out = {"first": ranked[0] if math.isfinite(key(ranked[0])[0]) else None,
           "best_baseline": best["baseline"], "best_secant": best["secant"]}
    for f, o in best.items():
        if o is not None:
            s = list(_per_seed(runs_by_opt[o], "steps_to_target").values())
            out[f"{f}_steps"] = {"median": median_or_inf(s), "min": min(s), "max": max(s)}
    if best["baseline"] is None or best["secant"] is None:
        return out
    for what, k in (("steps", "steps_to_target"), ("time", "projected_time_to_target"),
                    ("measured_time", "time_to_target")):
        b = _per_seed(runs_by_opt[best["baseline"]], k)
        s = _per_seed(runs_by_opt[best["secant"]], k)
        seeds = sorted(set(b) & set(s))
        ratios = [r for r in (_ratio(b[i], s[i]) for i in seeds) if r is not None]
        out[f"factor_{what}"] = {
            "median": _ratio(median_or_inf([b[i] for i in seeds]),
                             median_or_inf([s[i] for i in seeds])),
            "min": min(ratios, default=None), "max": max(ratios, default=None)}
        if what == "steps":
            out["every_seed"] = bool(seeds) and all(s[i] < b[i] for i in seeds)
            out["secant_loses_every_seed"] = any(s[i] > b[i] for i in seeds) and all(
                s[i] > b[i] or math.isinf(s[i]) and math.isinf(b[i]) for i in seeds)
    return out


def _ratio(baseline: float, secant: float) -> float | None:
    """baseline / secant: ``inf`` when only the secant method reaches the target, 0 when only
    the baseline does, ``None`` when neither."""
    if math.isinf(baseline) and math.isinf(secant):
        return None
    if math.isinf(secant):
        return 0.0
    if math.isinf(baseline):
        return INF
    return baseline / secant if secant > 0 else INF
