"""Scoring, after AlgoPerf (Dahl et al. 2023): time-to-target per run, the one statistic over
seeds, performance profiles across problems, the geometric-mean speedup against a baseline,
and the verdict (``docs/bench.md``, Report and verdict).

* time-to-target of one run: the training time (and step count) at the first evaluation whose
  training loss is at or below the target; ``inf`` if it never gets there.
* over seeds (:func:`over_seeds`, used by every table, the verdict and the plots): a seed
  without a value (target not reached; a final loss of a run that diverged or failed) counts
  as ``inf``; the median is then ``inf`` when at least half of the seeds have none; min and
  max are over all seeds; ``finite`` counts the seeds with a value.
* performance ratio ``r[p][o] = t[p][o] / min_o' t[p][o']`` (``inf`` when ``o`` misses the
  target or nobody reaches it); profile ``ρ_o(τ) = |{p : r[p][o] ≤ τ}| / |P|``.
* speedup of ``o`` against ``base`` = ``exp(mean_p log(t[p][base] / t[p][o]))`` over the
  problems where both reach the target; ``None`` when there is no such problem.
"""

from __future__ import annotations

import math
import statistics

INF = math.inf
STEPS, PROJECTED, MEASURED = "steps_to_target", "projected_time_to_target", "time_to_target"


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


def over_seeds(values: list[float | None]) -> dict:
    """The statistic over seeds: ``values`` holds one value per seed, ``None`` or a
    non-finite value where the seed has none, counted as ``inf``. Returns ``median`` (``inf``
    when at least half of the seeds have none), ``min``, ``max``, ``finite`` (seeds with a
    value) and ``n`` (seeds)."""
    vals = sorted(_value(v) for v in values)
    return {"median": median_or_inf(vals), "min": vals[0] if vals else INF,
            "max": vals[-1] if vals else INF, "finite": sum(math.isfinite(v) for v in vals),
            "n": len(vals)}


def _value(v: float | None) -> float:
    """A seed's value, ``inf`` where it has none."""
    return INF if v is None or not math.isfinite(v) else float(v)


def curve_over_seeds(runs: list[dict], x_key: str, y_key: str
                     ) -> tuple[list[float], list[float], list[float], list[float]]:
    """One optimizer's loss curve on one problem as ``(x, median, low, high)`` lists.

    The runs are aligned by evaluation index (every run of a problem evaluates at the same
    fractions of its budget). At each index, ``x`` (``"step"`` or ``"time"``) is the median
    over the runs that evaluated there; ``median`` is :func:`over_seeds` over all runs, a run
    that stopped without finishing (diverged or failed) counted as ``inf`` from its stop on,
    as in the tables; ``low`` and ``high`` are the least and greatest finite loss of the runs
    that evaluated there (``nan`` if none), so a stopped run ends at its last evaluation
    instead of stretching the band to ``inf``."""
    xs, med, lo, hi = [], [], [], []
    for i in range(max((len(r["curve"]) for r in runs), default=0)):
        present = [r["curve"][i] for r in runs if i < len(r["curve"])]
        stopped = sum(i >= len(r["curve"]) and r["status"] != "ok" for r in runs)
        losses = [p[y_key] for p in present]
        finite = [v for v in losses if math.isfinite(v)]
        xs.append(float(statistics.median(p[x_key] for p in present)))
        med.append(over_seeds(losses + [None] * stopped)["median"])
        lo.append(min(finite, default=math.nan))
        hi.append(max(finite, default=math.nan))
    return xs, med, lo, hi


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


# -------------------------------------------------------------------------------- verdict
def _by_seed(runs: list[dict], key: str) -> dict[int, float | None]:
    return {r["config"]["seed"]: r.get(key) for r in runs}


def verdict(runs_by_opt: dict[str, list[dict]], families: dict[str, str]) -> dict | None:
    """Who reaches the target first, in steps, and by what factor the best secant method
    beats (> 1) or trails (< 1) the best baseline.

    ``runs_by_opt[o]`` are o's runs with ``steps_to_target``, ``projected_time_to_target``
    and ``time_to_target`` set (``None`` = missed or diverged). Every statistic is
    :func:`over_seeds`, the one the tables show. The best of a family is the one with the
    lowest median steps (ties: most seeds reaching the target, then lowest median projected
    time, then lowest median final training loss); ``first`` is the best overall when its
    median is reached. ``secant_steps`` / ``baseline_steps`` are the two best's step
    statistics; ``factor_steps``, ``factor_time`` (projected) and ``factor_measured_time``
    compare them (:func:`compare`); ``every_seed`` / ``secant_loses_every_seed`` repeat the
    steps outcome as flags."""
    stats = {o: {k: over_seeds(list(_by_seed(rs, k).values()))
                 for k in (STEPS, PROJECTED, "final_train_loss")}
             for o, rs in runs_by_opt.items()}

    def rank(o: str) -> tuple[float, int, float, float]:
        s = stats[o]
        return (s[STEPS]["median"], -s[STEPS]["finite"], s[PROJECTED]["median"],
                s["final_train_loss"]["median"])

    ranked = sorted(runs_by_opt, key=rank)
    if not ranked:
        return None
    best = {f: next((o for o in ranked if families.get(o) == f), None)
            for f in ("baseline", "secant")}
    out = {"first": ranked[0] if math.isfinite(rank(ranked[0])[0]) else None,
           "best_baseline": best["baseline"], "best_secant": best["secant"]}
    for f, o in best.items():
        if o is not None:
            out[f"{f}_steps"] = stats[o][STEPS]
    if best["baseline"] is None or best["secant"] is None:
        return out
    for what, k in (("steps", STEPS), ("time", PROJECTED), ("measured_time", MEASURED)):
        out[f"factor_{what}"] = compare(_by_seed(runs_by_opt[best["baseline"]], k),
                                        _by_seed(runs_by_opt[best["secant"]], k))
    out["every_seed"] = out["factor_steps"]["every_seed"] == "secant"
    out["secant_loses_every_seed"] = out["factor_steps"]["every_seed"] == "baseline"
    return out


def compare(baseline: dict[int, float | None], secant: dict[int, float | None]) -> dict:
    """Baseline against secant method on one measure (``{seed: value}``, ``None`` = not
    reached, counted as ``inf``), paired by seed.

    ``median``: the ratio (:func:`ratio`) of the two :func:`over_seeds` medians, i.e. of the
    medians the tables show; ``per_seed``: the ratio on each common seed, in seed order;
    ``min`` / ``max``: over the per-seed ratios that are defined; ``every_seed``:
    ``"secant"`` when the secant method is faster on every seed, ``"baseline"`` when the
    baseline is faster on every seed where either reaches the target (a seed where neither
    does contradicts neither; a win of the secant method needs every seed), else ``None``."""
    seeds = sorted(set(baseline) & set(secant))
    b = {i: _value(baseline[i]) for i in seeds}
    s = {i: _value(secant[i]) for i in seeds}
    per_seed = [ratio(b[i], s[i]) for i in seeds]
    defined = [r for r in per_seed if r is not None]
    if seeds and all(s[i] < b[i] for i in seeds):
        every = "secant"
    elif any(b[i] < s[i] for i in seeds) and all(b[i] < s[i] or b[i] == s[i] == INF
                                                  for i in seeds):
        every = "baseline"
    else:
        every = None
    return {"median": ratio(over_seeds(list(baseline.values()))["median"],
                            over_seeds(list(secant.values()))["median"]),
            "min": min(defined, default=None), "max": max(defined, default=None),
            "per_seed": per_seed, "every_seed": every}


def ratio(baseline: float, secant: float) -> float | None:
    """baseline / secant: ``inf`` when only the secant method reaches the target, 0 when only
    the baseline does, ``None`` when neither."""
    if math.isinf(baseline) and math.isinf(secant):
        return None
    if math.isinf(secant):
        return 0.0
    if math.isinf(baseline):
        return INF
    if secant == 0:
        return 1.0 if baseline == 0 else INF
    return baseline / secant
