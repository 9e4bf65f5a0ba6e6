"""``secant tune``: the search behind the committed table (``docs/bench.md``, Tuning and
Targets).

For each problem and optimizer, at the problem's full budget and on tuning seeds that the
evaluation does not use (1000, 1001, ...; evaluation uses 0, 1, ...):

1. search the learning rate on the entry's log grid (the second knob at its default);
2. search the knob (damping, β, weight decay) on its log grid at that learning rate (a grid of
   one value fixes the knob there: no search);
3. if the knob moved, search the learning rate again around the best value.

Each search extends its grid by one point past an edge, at the grid's own ratio, while the best
value sits on that edge (at most ``MAX_EXTENSIONS`` times), so the chosen value ends strictly
inside the values tried, or the table says why not. The score of a value is the median over
tuning seeds of the final training loss; a diverged or failed run scores ``inf`` and is never
chosen. Then every tuned baseline runs on the reference seeds, and the problem's target is
:func:`secant.bench.scoring.target_from_reference` of their training losses at 3/4 of the
budget (:func:`target_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from secant.bench import scoring

MAX_EXTENSIONS = 3
TUNE_SEED = 1000
REFERENCE_SEEDS = (1000, 1001, 1002)


def snap(v: float) -> float:
    """``v`` moved to the nearest (in log) value of the 1–3 series ``{1, 3} × 10^k``, so
    extended and re-centred grids hit the values the registry's grids use."""
    k = math.floor(math.log10(v))
    m = min((1.0, 3.0, 10.0), key=lambda m: abs(math.log(v / (m * 10**k))))
    return float(f"{m * 10**k:.12g}")


def search(score: Callable[[float], float], grid: list[float],
           bounds: tuple[float, float] = (0.0, math.inf),
           max_extensions: int = MAX_EXTENSIONS) -> tuple[float | None, dict[float, float], str]:
    """Minimise ``score`` over a log grid (increasing, at least two points), extending it at
    an edge while the best value sits there; an extension past ``bounds`` is clamped to the
    bound (tried once). Returns ``(best, scores, note)``: ``best`` is
    ``None`` when every value scored ``inf``; ``note`` is empty when ``best`` is strictly
    inside the values tried, else says why it is not."""
    if len(grid) < 2:
        raise ValueError(f"grid={grid}: expected at least two values")
    pts = sorted(grid)
    scores = {u: score(u) for u in pts}
    for _ in range(max_extensions + 1):
        finite = {u: s for u, s in scores.items() if math.isfinite(s)}
        if not finite:
            return None, scores, "every value diverged or failed"
        best = min(finite, key=lambda u: (finite[u], u))
        pts = sorted(scores)
        if pts[0] < best < pts[-1]:
            return best, scores, ""
        low = best == pts[0]
        ratio = (pts[1] / pts[0]) if low else (pts[-1] / pts[-2])
        new = min(max(snap(best / ratio if low else best * ratio), bounds[0]), bounds[1])
        if new in scores or new <= 0:
            return best, scores, f"at the {'lower' if low else 'upper'} edge of the valid range"
        if len(scores) - len(grid) >= max_extensions:
            break
        scores[new] = score(new)
    best = min((u for u in scores if math.isfinite(scores[u])), key=lambda u: (scores[u], u))
    pts = sorted(scores)
    if pts[0] < best < pts[-1]:
        return best, scores, ""
    return best, scores, f"still at an edge after {max_extensions} extensions"


def median_final(runs: list[dict]) -> float:
    """The tuning score: median over seeds of the final training loss, ``inf`` for a run that
    did not finish ``ok``."""
    return scoring.median_or_inf([r["final_train_loss"] if r["status"] == "ok" else math.inf
                                  for r in runs])


TARGET_FRACTION = 0.75


def target_loss(run: dict, fraction: float = TARGET_FRACTION) -> float:
    """A reference run's training-subset loss at the first evaluation at or after
    ``fraction`` of its steps (``inf`` unless ``ok``): what targets are measured on. Reading
    it at 3/4 of the budget leaves the target-setting baseline headroom, as AlgoPerf sets its
    budgets above the time its target-setting runs needed, so the baseline reaches its own
    target on (nearly) every evaluation seed instead of on half of them."""
    if run["status"] != "ok" or not run["curve"]:
        return math.inf
    last = run["curve"][-1]["step"]
    point = next(p for p in run["curve"] if p["step"] >= fraction * last)
    return float(point["train_loss"])


def tune_entry(run: Callable[[float, dict, int], dict], lr_grid: list[float], knob,
               seeds: list[int]) -> dict:
    """The three searches for one optimizer. ``run(lr, knob_dict, seed)`` trains once (the
    caller caches). Returns the choice: ``lr``, ``knob``, ``loss``, the points tried and the
    notes."""
    knob_value = {} if knob is None else {knob.name: knob.default}
    tried: dict[tuple, float] = {}

    def score(lr: float, kv: dict) -> float:
        key = (lr, tuple(sorted(kv.items())))
        if key not in tried:
            tried[key] = median_final([run(lr, kv, s) for s in seeds])
        return tried[key]

    lr, _, lr_note = search(lambda u: score(u, knob_value), list(lr_grid))
    knob_note = ""
    if lr is not None and knob is not None and len(knob.grid) > 1:
        u_best, _, knob_note = search(
            lambda u: score(lr, {knob.name: knob.from_search(u)}),
            [knob.to_search(v) for v in knob.grid], bounds=knob.bounds)
        if u_best is not None and knob.from_search(u_best) != knob.default:
            knob_value = {knob.name: knob.from_search(u_best)}
            ratio = lr_grid[1] / lr_grid[0]
            lr, _, lr_note = search(lambda u: score(u, knob_value),
                                    [snap(lr / ratio), lr, snap(lr * ratio)])
    elif knob is not None:
        knob_note = "fixed, not searched (a grid of one value)"
    points = [{"lr": k[0], **dict(k[1]), "loss": (v if math.isfinite(v) else None)}
              for k, v in sorted(tried.items())]
    return {"lr": lr, "knob": knob_value, "loss": None if lr is None else score(lr, knob_value),
            "lr_note": lr_note, "knob_note": knob_note, "points": points}
