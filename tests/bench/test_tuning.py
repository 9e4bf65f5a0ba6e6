"""Tuning: the grid search extends at edges and never chooses a diverged value; the target
rule and the verdict on hand-made runs; projected time to target."""

import math

import pytest

from secant.bench import scoring as S
from secant.bench import tuning as T
from secant.bench.registry import Knob

INF = math.inf


def test_snap_to_one_three_series():
    assert [T.snap(v) for v in (0.0949, 9.49e-5, 0.033, 2e-3, 0.3)] == [0.1, 1e-4, 0.03, 3e-3, 0.3]


def test_search_extends_until_inside():
    calls = []

    def score(u):
        calls.append(u)
        return (math.log10(u) + 4) ** 2  # minimum at 1e-4, below the grid

    best, scores, note = T.search(score, [1e-3, 3e-3, 1e-2])
    # extended downwards 3e-4, 1e-4, 3e-5: 1e-4 is now strictly inside
    assert best == pytest.approx(1e-4) and note == ""
    assert sorted(scores) == pytest.approx([3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    assert len(calls) == len(set(calls))  # no value trained twice


def test_search_gives_up_after_max_extensions_and_says_so():
    best, scores, note = T.search(lambda u: -u, [1e-3, 1e-2], max_extensions=2)
    assert best == pytest.approx(1.0) and "still at an edge after 2" in note
    assert len(scores) == 4


def test_search_never_picks_diverged_values():
    # the lowest scores would be at large values, but they diverge (inf)
    def score(u):
        return INF if u >= 0.03 else 1.0 / u

    best, scores, note = T.search(score, [1e-3, 3e-3, 1e-2, 3e-2, 0.1])
    assert best == pytest.approx(1e-2) and note == ""
    assert T.search(lambda u: INF, [1e-3, 1e-2]) == (None, {1e-3: INF, 1e-2: INF},
                                                      "every value diverged or failed")


def test_search_clamps_extensions_to_the_knob_bounds():
    knob = Knob("beta", 0.99, (0.9, 0.99, 0.999), complement=True, bounds=(1e-4, 0.3))
    grid = [knob.to_search(v) for v in knob.grid]
    best, scores, note = T.search(lambda u: -u, grid, bounds=knob.bounds)
    # 1 - beta: 0.1 is the top of the grid; the next value (1.0) is clamped to the bound 0.3
    assert best == 0.3 and knob.from_search(best) == pytest.approx(0.7)
    assert "upper edge of the valid range" in note and max(scores) == 0.3
    best, scores, note = T.search(lambda u: u, grid, bounds=knob.bounds)
    # extended down to 1 - beta = 1e-4 exactly (the bound, no round-off), not past it
    assert best == 1e-4 and min(scores) == 1e-4 and "lower edge of the valid range" in note


def _run(status, final, curve_end=None):
    return {"status": status, "final_train_loss": final,
            "curve": [{"step": 0, "time": 0.0, "train_loss": 9.0},
                      {"step": 10, "time": 1.0, "train_loss": final if curve_end is None
                       else curve_end}]}


def test_tune_entry_skips_diverged_lr_and_tunes_knob():
    knob = Knob("damping", 0.1, (0.01, 0.1, 1.0))

    def run(lr, kv, seed):
        if lr >= 0.1:
            return _run("diverged", None)
        d = kv["damping"]
        return _run("ok", (math.log10(lr) + 2) ** 2 + (math.log10(d) + 1) ** 2 + 1)

    c = T.tune_entry(run, [1e-3, 1e-2, 0.1], knob, [1000])
    assert c["lr"] == pytest.approx(1e-2) and c["knob"] == {"damping": 0.1}
    assert c["loss"] == pytest.approx(1.0) and c["lr_note"] == c["knob_note"] == ""
    assert any(p["loss"] is None for p in c["points"])  # the diverged point is recorded


def test_target_rule_on_hand_made_runs():
    finals = {"sgd": [0.5, 0.4, 0.6], "adam": [0.3, 0.2, INF], "muon": [INF, INF, 0.1]}
    assert S.target_from_reference(finals) == (0.3, "adam")  # median of adam's, inf counted
    assert S.target_from_reference({"sgd": [INF, INF, 1.0]}) is None
    run = {"status": "ok", "curve": [{"step": k * 10, "train_loss": 10.0 - k}
                                      for k in range(9)]}  # steps 0..80, evaluated every 10
    assert T.target_loss(run) == 4.0  # step 60 = 3/4 of 80
    assert T.target_loss(run, fraction=1.0) == 2.0
    assert T.target_loss(_run("diverged", None)) == INF


def test_projected_time_to_target():
    assert S.projected_time(120, 0.005) == pytest.approx(0.6)
    assert S.projected_time(None, 0.005) is None
    assert S.steps_to_target([{"step": 0, "time": 0, "train_loss": 3.0},
                              {"step": 7, "time": 9.0, "train_loss": 1.0}], 1.0) == 7


def _seeded(steps, step_time=0.01):
    return [{"config": {"seed": i}, "steps_to_target": s,
             "projected_time_to_target": None if s is None else s * step_time,
             "time_to_target": None if s is None else 2 * s * step_time}
            for i, s in enumerate(steps)]


def test_verdict_every_seed_and_factor():
    fam = {"adam": "baseline", "sgd": "baseline", "kfac": "secant", "kbfgs": "secant"}
    v = S.verdict({"adam": _seeded([100, 120, 110]), "sgd": _seeded([300, None, 200]),
                   "kfac": _seeded([50, 60, 40]), "kbfgs": _seeded([None, None, 90])}, fam)
    assert v["first"] == "kfac" and v["best_baseline"] == "adam" and v["best_secant"] == "kfac"
    assert v["factor_steps"]["median"] == pytest.approx(110 / 50)
    assert v["factor_steps"]["min"] == pytest.approx(2.0)
    assert v["factor_steps"]["max"] == pytest.approx(110 / 40)
    assert v["every_seed"] is True and v["secant_loses_every_seed"] is False
    # slower projected step time halves the time factor
    v2 = S.verdict({"adam": _seeded([100, 100, 100]), "kfac": _seeded([50, 120, 40], 0.04)},
                   fam)
    assert v2["every_seed"] is False and v2["factor_time"]["median"] == pytest.approx(0.5)


def test_verdict_best_of_a_family_that_misses_by_seeds_reached_then_final_loss():
    fam = {"adam": "baseline", "kfac": "secant", "kbfgs": "secant", "mlbfgs": "secant"}
    runs = {"adam": _seeded([10, 10, 10]), "mlbfgs": _seeded([None, None, None]),
            "kfac": _seeded([None, None, None]), "kbfgs": _seeded([None, 50, None])}
    for o, f in (("mlbfgs", 3.0), ("kfac", 1.0), ("kbfgs", 2.0)):
        for r in runs[o]:
            r["final_train_loss"] = f
    assert S.verdict(runs, fam)["best_secant"] == "kbfgs"  # reached on one seed
    runs["kbfgs"] = _seeded([None, None, None])
    for r in runs["kbfgs"]:
        r["final_train_loss"] = 2.0
    assert S.verdict(runs, fam)["best_secant"] == "kfac"  # nobody reached: lowest final loss


def test_verdict_loss_counts_seeds_where_both_miss_as_neither():
    fam = {"soap": "baseline", "kfac": "secant"}
    v = S.verdict({"soap": _seeded([320, 360, None]), "kfac": _seeded([None, None, None])}, fam)
    assert v["first"] == "soap" and v["every_seed"] is False
    assert v["secant_loses_every_seed"] is True and v["factor_steps"]["median"] == 0.0


def test_tune_entry_one_value_knob_grid_is_fixed_and_said():
    knob = Knob("damping", 0.1, (0.3,))
    seen = []

    def run(lr, kv, seed):
        seen.append(kv["damping"])
        return _run("ok", (math.log10(lr) + 2) ** 2 + 1)

    c = T.tune_entry(run, [1e-3, 1e-2, 0.1], knob, [1000])
    assert c["lr"] == pytest.approx(1e-2) and set(seen) == {0.1}  # no knob search ran
    assert c["knob"] == {"damping": 0.1} and "fixed" in c["knob_note"]
