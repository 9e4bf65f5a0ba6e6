"""Equal-cost budgets: steps from costs, and interleaved calibration on a fake clock."""

import pytest

from secant.bench.calibration import equal_cost_steps, interleaved_costs


def test_steps_share_the_reference_cost():
    steps = equal_cost_steps({"adam": 0.01, "kbfgs": 0.029, "sgd": 0.008}, "adam", 1000)
    assert steps == {"adam": 1000, "kbfgs": 344, "sgd": 1250}
    assert equal_cost_steps({"adam": 1.0, "slow": 5000.0}, "adam", 3)["slow"] == 1


def test_unknown_reference_is_refused():
    with pytest.raises(ValueError, match="'adam' was not calibrated"):
        equal_cost_steps({"sgd": 0.1}, "adam", 10)


class FakeClock:
    """Time advances only when a stepper runs: each costs a fixed amount, plus a load spike
    that hits whichever contender runs during a fixed window of the fake time."""

    def __init__(self):
        self.t = 0.0
        self.spikes = 0

    def __call__(self):
        return self.t

    def stepper(self, cost):
        def step():
            spike = 10.0 if 0.5 <= self.t < 0.52 else 0.0  # one step, in round 2
            self.spikes += spike > 0
            self.t += cost + spike
        return step


def test_interleaved_medians_ignore_a_load_spike_and_rotate_order():
    clk = FakeClock()
    order = []

    def tracked(name, cost):
        inner = clk.stepper(cost)

        def step():
            order.append(name)
            inner()
        return step

    steppers = {"a": tracked("a", 0.01), "b": tracked("b", 0.03), "c": tracked("c", 0.02)}
    costs = interleaved_costs(steppers, rounds=7, steps=4, warmup=2, now=clk)
    assert clk.spikes == 1
    assert costs == pytest.approx({"a": 0.01, "b": 0.03, "c": 0.02})
    timed = order[3 * 2:]  # after the warm-up steps
    firsts = [timed[i * 12] for i in range(7)]  # first contender of each round
    assert firsts[:3] == ["a", "b", "c"]  # the order rotates


def test_bench_equal_cost_gives_each_optimizer_the_reference_cost(tmp_path, monkeypatch):
    """End to end on a fake cost: K-BFGS calibrated 4× Adam's cost per step runs a quarter of
    Adam's steps; the costs and steps are recorded and reported."""
    import json

    from secant.bench import calibration
    from secant.cli import main

    def fake(problem, contenders, data, batch, device, **kw):
        costs = {"adam": 1e-3, "sgd": 5e-4, "kbfgs": 4e-3}
        return {e.name: costs[e.name] for e, _, _ in contenders}

    monkeypatch.setattr(calibration, "calibrate", fake)
    out = tmp_path / "out"
    rc = main(["bench", "--problem", "digits-clf", "--optimizers", "adam,sgd,kbfgs",
               "--epochs", "0.5", "--seeds", "1", "--equal-cost", "adam", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    steps = {r["config"]["optimizer"]: r["steps"] for r in res["runs"]}
    assert steps["sgd"] == 2 * steps["adam"] and steps["kbfgs"] == steps["adam"] // 4
    ec = res["problems"]["digits-clf"]["equal_cost"]
    assert ec["reference"] == "adam" and ec["steps"] == steps
    assert "Equal-cost budget" in (out / "report.md").read_text()


def test_equal_cost_refuses_a_reference_not_run(tmp_path, capsys):
    from secant.cli import main

    rc = main(["bench", "--problem", "quadratic", "--optimizers", "sgd", "--equal-cost", "adam",
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--equal-cost adam" in capsys.readouterr().err


def test_calibrate_measures_real_steps():
    import torch

    from secant.bench.calibration import calibrate
    from secant.bench.problems import get_problem
    from secant.bench.registry import get_optimizer

    p = get_problem("digits-clf")
    data = p.load(None, False)
    costs = calibrate(p, [(get_optimizer("sgd"), 0.1, {}), (get_optimizer("kbfgs"), 0.1,
                                                            {"damping": 0.3})],
                      data, 32, torch.device("cpu"), rounds=3, steps=2, warmup=1)
    assert set(costs) == {"sgd", "kbfgs"} and all(c > 0 for c in costs.values())
    assert costs["kbfgs"] > costs["sgd"]  # two passes and the curvature work
