"""The runner: closure-driven steps, divergence, evaluation context, optimizer-state bytes."""

import contextlib

import torch
from torch import nn

from secant.bench.problems import get_problem
from secant.bench.registry import OptimizerEntry, get_optimizer
from secant.bench.runner import RunConfig, run_one, state_bytes


def _factory(cls):
    return lambda model, lr, knob: cls(model.parameters(), lr=lr, **knob)


def _cfg(opt, lr, steps=None, seconds=None, problem="quadratic"):
    return RunConfig(problem, opt, lr, "test", 0, 64, seconds, steps, "cpu", 4)


def test_state_bytes_adam_by_hand():
    lin = nn.Linear(3, 2)  # 6 + 2 parameters
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    # exp_avg and exp_avg_sq: 2 * 8 floats * 4 bytes; two float32 step scalars: 2 * 4 bytes
    assert state_bytes(opt) == 2 * 8 * 4 + 2 * 4


def test_state_bytes_counts_shared_storage_once():
    class Fake:
        def state_dict(self):
            t = torch.zeros(10)
            return {"state": {0: {"a": t, "b": t[2:5], "c": [t.view(2, 5)]},
                              1: {"d": torch.zeros(3, dtype=torch.float64)}}}

    assert state_bytes(Fake()) == 10 * 4 + 3 * 8


def test_epoch_budget_counts_steps_and_curve():
    p = get_problem("quadratic")
    data = p.load(None, False)
    rec = run_one(p, get_optimizer("sgd"), data, _cfg("sgd", 1e-3, steps=2.0), progress=False)
    # 1000 examples, batch 64 -> 15 full batches per epoch, 2 epochs
    assert rec["status"] == "ok" and rec["steps"] == 30
    assert rec["curve"][0]["step"] == 0 and rec["curve"][-1]["step"] == 30
    # the quadratic's loss cannot go below 0 and its start (theta = 3) is far above optimum
    assert rec["final_train_loss"] < rec["curve"][0]["train_loss"]
    assert rec["median_step_time"] > 0 and rec["opt_state_bytes"] == 100 * 4  # momentum


def test_divergence_is_recorded():
    p = get_problem("quadratic")
    data = p.load(None, False)
    rec = run_one(p, get_optimizer("sgd"), data, _cfg("sgd", 1e3, steps=3.0), progress=False)
    assert rec["status"] == "diverged"
    assert "non-finite" in rec["message"]


def test_layer_optimizer_not_applicable_on_quadratic():
    p = get_problem("quadratic")
    entry = OptimizerEntry("layerish", "", "secant", lambda: _factory(torch.optim.SGD), 1.0,
                           (1.0,), needs_layers=True)
    rec = run_one(p, entry, p.load(None, False), _cfg("layerish", 1.0, steps=1.0),
                  progress=False)
    assert rec["status"] == "not applicable"


class _Displaced(torch.optim.SGD):
    """SGD whose evaluation weights are zero: tells whether evaluation used undisplaced()."""

    entered = 0

    @contextlib.contextmanager
    def undisplaced(self):
        type(self).entered += 1
        saved = [p.detach().clone() for p in self.param_groups[0]["params"]]
        for p in self.param_groups[0]["params"]:
            p.data.zero_()
        try:
            yield
        finally:
            for p, s in zip(self.param_groups[0]["params"], saved):
                p.data.copy_(s)


def test_evaluation_uses_undisplaced_and_closure_steps():
    p = get_problem("quadratic")
    data = p.load(None, False)
    entry = OptimizerEntry("disp", "", "baseline", lambda: _factory(_Displaced), 1e-3, (1e-3,))
    rec = run_one(p, entry, data, _cfg("disp", 1e-3, steps=1.0), progress=False)
    assert _Displaced.entered >= 3
    # at theta = 0 the loss is the mean of x^T H x / 2 over the evaluated examples
    h = p.build().hessian
    x = data.x_train
    expect = (0.5 * ((x @ h) * x).sum(1)).mean().item()
    assert abs(rec["final_train_loss"] - expect) < 1e-3 * expect


def test_failing_optimizer_is_recorded_not_raised():
    def broken(*a, **k):
        raise ValueError("lr=-1: expected a value >= 0")

    p = get_problem("quadratic")
    entry = OptimizerEntry("broken", "", "baseline", lambda: _factory(broken), 1.0, (1.0,))
    rec = run_one(p, entry, p.load(None, False), _cfg("broken", 1.0, steps=1.0), progress=False)
    assert rec["status"] == "error" and "lr=-1" in rec["message"]


def test_warm_start_never_uses_more_batches_than_the_run_trains():
    import secant

    used = []

    class Spy(secant.KBFGS):
        def warm_start(self, batches, forward=None, *, max_batches=None):
            used.append(super().warm_start(batches, forward, max_batches=max_batches))
            return used[-1]

    p = get_problem("digits")  # 1,297 training images: 12 batches of 100 per epoch
    entry = OptimizerEntry("spy", "", "secant", lambda: (lambda m, lr, k: Spy(m, lr=lr)), 0.1,
                           (0.1,), needs_layers=True, warm_start=True)
    for epochs, expect in ((0.25, 3), (2.0, 12)):
        cfg = RunConfig("digits", "spy", 0.1, "test", 0, 100, None, epochs, "cpu", 2)
        assert run_one(p, entry, p.load(None, False), cfg, progress=False)["status"] == "ok"
        assert used[-1] == expect  # the run's steps, at most one pass
