"""The plots' rules, read off the matplotlib Figure objects: one median line per optimizer
in a style of its own, the legend outside the axes, a diverged run marked inside the axes
even when its loss is above the y-range."""

import math

import pytest

pytest.importorskip("matplotlib")

from matplotlib.transforms import Bbox  # noqa: E402

from secant.bench import plots  # noqa: E402
from secant.bench.registry import OPTIMIZERS  # noqa: E402


def test_robust_ylim_ignores_one_spike():
    band = [1.0 + 0.01 * i for i in range(100)]  # the band where runs differ: [1, 1.99]
    lo, hi = plots.robust_ylim(band + [1e6, math.nan, math.inf])
    assert lo < 1.0 and 1.8 < hi < 3.0  # the 1e6 spike does not set the top
    lo, hi = plots.robust_ylim(band, floor=0.5)  # the target stays visible
    assert lo <= 0.5
    assert plots.robust_ylim([math.nan]) is None


def test_styles_fixed_per_optimizer_and_distinct():
    a = plots.optimizer_styles(["adam", "kfac"])
    b = plots.optimizer_styles(["kfac", "sgd", "adam", "muon"])
    assert a["adam"] == b["adam"] and a["kfac"] == b["kfac"]
    every = plots.optimizer_styles(list(OPTIMIZERS))
    for key in ("color", "marker"):
        assert len({s[key] for s in every.values()}) == len(every)
    k, kl = every["kbfgs"], every["kbfgsl"]  # neighbours differ in every respect
    assert k["ls"] != kl["ls"] and k["marker"] != kl["marker"] and k["color"] != kl["color"]


def _run(opt, seed, losses, status="ok", problem="p"):
    return {"config": {"problem": problem, "optimizer": opt, "seed": seed}, "status": status,
            "curve": [{"step": 10 * i, "time": 0.1 * i, "train_loss": v, "test_loss": v}
                      for i, v in enumerate(losses)]}


OPTS = ["sgd", "adam", "kfac", "kbfgs", "kbfgsl"]
RUNS = [_run(o, s, [10.0 / (1 + k * (j + 1) * (1 + 0.1 * s)) for k in range(20)])
        for j, o in enumerate(OPTS) for s in range(3) if o != "kfac"]
RUNS += [_run("kfac", s, [10.0, 1e4], status="diverged") for s in range(3)]  # far above
RUNS += [_run(o, s, [5.0, 4.0, 3.0], problem="q") for o in OPTS for s in range(2)]


def _inside(fig, ax, line):
    fig.draw_without_rendering()
    (x, y), = line.get_transform().transform(line.get_xydata())
    box = ax.get_window_extent()
    return box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1


def _legend_outside(fig):
    fig.draw_without_rendering()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    return all(not Bbox.intersection(box, ax.get_window_extent()) for ax in fig.axes)


@pytest.mark.parametrize("x_key", ["step", "time"])
def test_loss_plot_one_styled_line_per_optimizer_legend_outside(x_key):
    fig = plots.curve_figure(RUNS, {"p": 0.5, "q": 3.5}, x_key)
    assert len(fig.axes) == 4  # two problems × (training, test subset)
    for ax in fig.axes:
        named = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        assert sorted(ln.get_label() for ln in named) == sorted(OPTS)  # one median line each
        assert len({(ln.get_linestyle(), ln.get_marker()) for ln in named}) == len(OPTS)
        assert len(ax.collections) == len(OPTS)  # one band each
    assert _legend_outside(fig)


def test_diverged_run_above_the_range_is_marked_inside_the_axes():
    fig = plots.curve_figure(RUNS, {"p": 0.5}, "step")
    ax = fig.axes[0]
    assert ax.get_ylim()[1] < 1e4  # the diverged loss is above the y-range
    crosses = [ln for ln in ax.get_lines() if ln.get_marker() == "x"]
    assert len(crosses) == 3 and all(_inside(fig, ax, ln) for ln in crosses)
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["kfac diverged (3/3): loss 1e+04 ↑"]


def test_profile_one_styled_line_per_optimizer_legend_outside():
    steps = {"p": {"adam": 30.0, "kbfgs": 30.0, "kbfgsl": math.inf},
             "q": {"adam": 20.0, "kbfgs": 40.0, "kbfgsl": math.inf}}
    fig = plots.profile_figure(steps)
    (ax,) = fig.axes
    named = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert [ln.get_label() for ln in named] == ["adam", "kbfgs", "kbfgsl"]
    assert len({(ln.get_linestyle(), ln.get_marker()) for ln in named}) == 3
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "adam (reaches on 2/2)", "kbfgs (reaches on 2/2)", "kbfgsl (reaches on 0/2)"]
    assert _legend_outside(fig)
