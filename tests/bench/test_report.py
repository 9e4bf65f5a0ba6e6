"""Report helpers: robust y-range, fixed colours, verdict rows."""

import math

import pytest

from secant.bench import report


def test_robust_ylim_ignores_one_spike():
    band = [1.0 + 0.01 * i for i in range(100)]  # the band where runs differ: [1, 1.99]
    lo, hi = report.robust_ylim(band + [1e6, math.nan, math.inf])
    assert lo < 1.0 and 1.8 < hi < 3.0  # the 1e6 spike does not set the top
    lo, hi = report.robust_ylim(band, floor=0.5)  # the target stays visible
    assert lo <= 0.5
    assert report.robust_ylim([math.nan]) is None


def test_colours_fixed_per_optimizer_across_plots():
    a = report.optimizer_colors(["adam", "kfac"])
    b = report.optimizer_colors(["kfac", "sgd", "adam", "muon"])
    assert a["adam"] == b["adam"] and a["kfac"] == b["kfac"]
    every = report.optimizer_colors(["sgd", "sgd-norm", "adam", "adamw", "muon", "soap",
                                     "mlbfgs", "kfac", "kbfgs", "kbfgsl", "neumann"])
    assert len(set(every.values())) == 11


def test_verdict_row_text():
    v = {"first": "kfac", "best_baseline": "adam", "best_secant": "kfac",
         "secant_steps": {"median": 50.0, "min": 40.0, "max": 60.0},
         "baseline_steps": {"median": 110.0, "min": 100.0, "max": 120.0},
         "factor_steps": {"median": 2.2, "min": 2.0, "max": 2.75},
         "factor_time": {"median": 0.55, "min": 0.5, "max": 0.69},
         "every_seed": True, "secant_loses_every_seed": False}
    row = report.verdict_rows({"p": v}, {"p": 0.25})[0]
    assert row == ["p", "0.25", "kfac", "kfac: 50 [40–60]", "adam: 110 [100–120]",
                   "2.20× [2.00–2.75]", "0.55× [0.50–0.69]", "yes: secant wins"]


@pytest.mark.parametrize("seeds, n, text", [(3, 3, "5 [4–6]"), (3, 2, "5 [4–6] (2/3)")])
def test_range_format(seeds, n, text):
    assert report._fmt_range({"median": 5, "min": 4, "max": 6, "n": n}, ".0f", seeds) == text
