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
