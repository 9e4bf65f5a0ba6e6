"""Divergence: the ceiling rule by hand, the runner stopping on it, the trivial losses against
independent computations, and the step-time warm-up."""

import math

import numpy as np
import pytest
import torch

from secant.bench import budgets
from secant.bench.problems import Dataset, get_problem
from secant.bench.registry import OptimizerEntry
from secant.bench.runner import RunConfig, run_one


def test_ceiling_rule_by_hand():
    # first epoch: 1.5 x initial; afterwards 1.5 x min(initial, max(trivial, best so far))
    assert budgets.ceiling(543.0, 183.0, 300.0, 0.5) == pytest.approx(814.5)
    assert budgets.ceiling(543.0, 183.0, 150.0, 1.0) == pytest.approx(274.5)
    assert budgets.ceiling(543.0, 183.0, 400.0, 1.0) == pytest.approx(600.0)  # slow is fine
    assert budgets.ceiling(2.0, 2.3, 0.1, 3.0) == pytest.approx(3.0)
    assert budgets.ceiling(10.0, None, 4.0, 5.0) == pytest.approx(6.0)
    # the K-FAC run: 359.8 after a 183 plateau on curves is divergence
    assert budgets.diverged(359.8, 543.0, 183.2, 183.0, 10.0)
    assert not budgets.diverged(183.3, 543.0, 183.2, 183.0, 10.0)
    assert budgets.diverged(math.nan, 543.0, 183.2, 543.0, 0.1)
    assert budgets.diverged(math.inf, 543.0, None, 543.0, 0.1)


def test_warmup_steps_bounds():
    assert budgets.warmup_steps(10) == 3
    assert budgets.warmup_steps(400) == 20
    assert budgets.warmup_steps(10_000) == 50


def _ascent_entry():
    # gradient ascent: the loss rises steadily from the start, without going non-finite
    return OptimizerEntry("ascent", "", "baseline",
                          lambda: (lambda model, lr, knob: torch.optim.SGD(
                              model.parameters(), lr=lr, maximize=True)), 1e-3, (1e-3, 1e-2))


def test_runner_stops_a_run_above_the_ceiling():
    p = get_problem("quadratic")
    cfg = RunConfig("quadratic", "ascent", 0.005, "test", 0, 64, None, 20.0, "cpu", 40)
    rec = run_one(p, _ascent_entry(), p.load(None, False), cfg, progress=False)
    assert rec["status"] == "diverged" and "ceiling" in rec["message"]
    total = 20 * (1000 // 64)
    assert rec["steps"] < total  # stopped early
    losses = [c["train_loss"] for c in rec["curve"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] > 1.5 * min(losses[:-1])
    assert "final_train_loss" not in rec


def test_trivial_loss_classifier_is_entropy_of_class_frequencies():
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    data = Dataset(torch.zeros(6, 64), torch.zeros(1, 64), y, y[:1])
    q = np.array([3, 1, 2]) / 6
    assert get_problem("digits-clf").trivial_loss(data) == pytest.approx(-(q * np.log(q)).sum())


def test_trivial_loss_autoencoder_is_mean_image_bce():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(50, 784, generator=gen)
    data = Dataset(x, x[:5])
    xn = x.double().numpy()
    p = xn.mean(0)
    expect = -(xn * np.log(p) + (1 - xn) * np.log(1 - p)).sum(1).mean()
    assert get_problem("curves").trivial_loss(data) == pytest.approx(expect, rel=1e-9)
    assert get_problem("quadratic").trivial_loss(data) is None
