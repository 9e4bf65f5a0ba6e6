"""Scoring against hand-computed examples, and the one statistic over seeds."""

import math

import pytest

from secant.bench import scoring as S

INF = math.inf


def test_time_to_target_first_crossing():
    curve = [{"step": 0, "time": 0.0, "train_loss": 10.0},
             {"step": 5, "time": 1.5, "train_loss": 4.0},
             {"step": 9, "time": 2.5, "train_loss": 2.9},
             {"step": 12, "time": 3.0, "train_loss": 1.0}]
    assert S.time_to_target(curve, 3.0) == (2.5, 9)
    assert S.time_to_target(curve, 4.0) == (1.5, 5)  # "at or below"
    assert S.time_to_target(curve, 0.5) == (INF, -1)
    assert S.time_to_target(curve, None) == (INF, -1)


def test_median_with_misses():
    assert S.median_or_inf([3.0, 1.0, INF]) == 3.0
    assert S.median_or_inf([1.0, INF, INF]) == INF
    assert S.median_or_inf([]) == INF


def test_over_seeds_counts_a_seed_without_a_value_as_infinite():
    assert S.over_seeds([120, None, 114]) == {"median": 120.0, "min": 114.0, "max": INF,
                                              "finite": 2, "n": 3}
    assert S.over_seeds([114, None, math.nan])["median"] == INF  # half or more miss
    assert S.over_seeds([2.0, 4.0]) == {"median": 3.0, "min": 2.0, "max": 4.0, "finite": 2,
                                        "n": 2}


def test_curve_over_seeds_aligns_by_evaluation_and_counts_a_stopped_run_as_infinite():
    def run(status, losses):
        return {"status": status, "curve": [{"step": 10 * i, "time": 0.1 * i,
                                             "train_loss": v} for i, v in enumerate(losses)]}

    runs = [run("ok", [9.0, 5.0, 3.0]), run("ok", [9.0, 6.0, 2.0]),
            run("diverged", [9.0, 8.0])]
    xs, med, lo, hi = S.curve_over_seeds(runs, "step", "train_loss")
    assert xs == [0.0, 10.0, 20.0]
    assert med == [9.0, 6.0, 3.0]  # the diverged run counts as ∞ at step 20
    assert lo == [9.0, 5.0, 2.0] and hi == [9.0, 8.0, 3.0]  # the band: runs still there
    runs[1]["status"] = "diverged"
    runs[1]["curve"] = runs[1]["curve"][:1]  # two of three stopped: the median is infinite
    xs, med, lo, hi = S.curve_over_seeds(runs, "step", "train_loss")
    assert med == [9.0, 8.0, INF] and lo == [9.0, 5.0, 3.0] and hi == [9.0, 8.0, 3.0]


def test_performance_profile_by_hand():
    times = {"p1": {"a": 10.0, "b": 20.0, "c": INF},
             "p2": {"a": 30.0, "b": 15.0, "c": 45.0},
             "p3": {"a": INF, "b": INF, "c": INF}}
    r = S.performance_ratios(times)
    assert r["p1"] == {"a": 1.0, "b": 2.0, "c": INF}
    assert r["p2"] == {"a": 2.0, "b": 1.0, "c": 3.0}
    assert all(v == INF for v in r["p3"].values())
    prof = S.performance_profile(times, [1.0, 2.0, 2.5, 3.0])
    assert prof["a"] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert prof["b"] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert prof["c"] == pytest.approx([0, 0, 0, 1 / 3])


def test_geomean_speedup_by_hand():
    times = {"p1": {"adam": 10.0, "x": 5.0},     # x twice as fast
             "p2": {"adam": 10.0, "x": 40.0},    # x four times slower
             "p3": {"adam": INF, "x": 1.0},      # adam misses: not used
             "p4": {"adam": 8.0, "x": 1.0}}      # x eight times faster
    sp = S.geomean_speedup(times)
    # (2 * 0.25 * 8) ** (1/3) = 4 ** (1/3)
    assert sp["x"][0] == pytest.approx(4 ** (1 / 3))
    assert sp["x"][1] == 3
    assert sp["adam"] == (pytest.approx(1.0), 3)
    assert S.geomean_speedup({"p": {"adam": INF, "y": 2.0}})["y"] == (None, 0)


def test_ratio_conventions():
    assert S.ratio(120.0, 60.0) == 2.0
    assert S.ratio(120.0, INF) == 0.0 and S.ratio(INF, 60.0) == INF
    assert S.ratio(INF, INF) is None and S.ratio(0.0, 0.0) == 1.0


@pytest.mark.parametrize("baseline, secant, every", [
    ([100, 100, 100], [50, 60, 70], "secant"),
    ([100, 100, 100], [50, 60, None], None),  # secant faster on two seeds, not reached on one
    ([100, 100, None], [150, None, None], "baseline"),  # neither on seed 2: not against
    ([100, 100, None], [50, 60, None], None),  # a secant win needs every seed
    ([100, 100, 100], [150, 120, 90], None),
])
def test_compare_every_seed_is_read_from_the_per_seed_ratios(baseline, secant, every):
    f = S.compare(dict(enumerate(baseline)), dict(enumerate(secant)))
    assert f["every_seed"] == every
    per = [r for r in f["per_seed"] if r is not None]
    if every == "secant":
        assert min(per) > 1
    if every == "baseline":
        assert max(per) < 1
