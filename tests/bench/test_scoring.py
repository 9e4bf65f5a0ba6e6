"""Scoring against hand-computed examples."""

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
