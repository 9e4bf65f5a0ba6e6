"""The torch.optim contract, for every optimizer where it applies: copies and pickles that
continue exactly as the original, named parameters, one-element tensor learning rates of any
shape, default learning rates, load_state_dict pre-hooks, ``maximize`` and per-group LR
scheduling. References are torch.optim and the optimizers' own uncopied runs."""

import copy
import pickle

import pytest
import torch
from torch import nn

from secant import KBFGS, KBFGSL, KFAC, MomentumLBFGS, Neumann

PARAMETER = ("MomentumLBFGS", "Neumann")
ALL = (*PARAMETER, "KFAC", "KBFGS", "KBFGSL")
X = torch.randn(24, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = X[:, :2].sin()


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def build(name, m, params=None, **kw):
    """Settings under which curvature acts within a few steps."""
    params = m.parameters() if params is None else params
    if name == "MomentumLBFGS":
        return MomentumLBFGS(params, **{"lr": 0.05, "update_period": 2, "history_size": 3,
                                        "weight_decay": 1e-3, **kw})
    if name == "Neumann":
        return Neumann(params, **{"lr": 0.05, "burn_in_steps": 2, "reset_period": 3, **kw})
    if name == "KFAC":
        return KFAC(m, **{"lr": 0.05, "factor_update_period": 1, "inverse_update_period": 2,
                          **kw})
    return {"KBFGS": KBFGS, "KBFGSL": KBFGSL}[name](m, **{"lr": 0.1, **kw})


def loss(m, sign=1.0):
    return sign * nn.functional.mse_loss(m(X), Y)


def train(opt, m, steps, sign=1.0):
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            value = loss(m, sign)
            value.backward()
            return value
        opt.step(closure)


def params_of(m):
    return [p.detach().clone() for p in m.parameters()]


def assert_same(a, b):
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def assert_close_params(m1, m2):
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ALL)
def test_a_copy_continues_exactly_as_the_original(name, how):
    m = model()
    opt = build(name, m)
    torch.optim.lr_scheduler.StepLR(opt, step_size=100)  # wraps opt.step in the instance
    train(opt, m, 5)  # curvature in use by now
    m2, opt2 = (copy.deepcopy((m, opt)) if how == "deepcopy"
                else pickle.loads(pickle.dumps((m, opt))))
    train(opt, m, 4)
    train(opt2, m2, 4)
    assert_same(params_of(m2), params_of(m))
    fresh = model()
    assert max((p - q).abs().max() for p, q in zip(m.parameters(), fresh.parameters())) > 1e-3


@pytest.mark.parametrize("name", PARAMETER)
def test_named_parameters_train_as_parameters(name):
    a, b = model(), model()
    opt_a, opt_b = build(name, a), build(name, b, params=b.named_parameters())
    assert "param_names" in opt_b.param_groups[0]
    train(opt_a, a, 6)
    train(opt_b, b, 6)
    assert_same(params_of(b), params_of(a))


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("name", PARAMETER)
def test_one_element_tensor_lr_of_any_shape(name, shape):
    a, b = model(), model()
    opt_a = build(name, a, lr=0.05)
    opt_b = build(name, b, lr=torch.full(shape, 0.05, dtype=torch.float64))
    train(opt_a, a, 6)
    train(opt_b, b, 6)
    assert_close_params(b, a)


@pytest.mark.parametrize("name", PARAMETER)
def test_bad_lr_and_maximize_raise_value_error(name):
    with pytest.raises(ValueError, match="lr="):
        build(name, model(), lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="lr="):
        build(name, model(), lr=float("nan"))
    with pytest.raises(ValueError, match="maximize="):
        build(name, model(), maximize=1)


@pytest.mark.parametrize("cls", [MomentumLBFGS, Neumann])
def test_default_lr_and_per_group_lrs(cls):
    m = model()
    groups = [{"params": m[0].parameters(), "lr": 0.02}, {"params": m[2].parameters()}]
    opt = cls(groups)  # generic code: no lr argument
    assert opt.param_groups[0]["lr"] == 0.02
    assert opt.param_groups[1]["lr"] == opt.defaults["lr"] > 0


@pytest.mark.parametrize("name", PARAMETER)
def test_maximize_ascends(name):
    """maximize=True on f moves exactly as the default does on −f."""
    a, b = model(), model()
    opt_a, opt_b = build(name, a), build(name, b, maximize=True)
    train(opt_a, a, 6, sign=-1.0)
    train(opt_b, b, 6, sign=1.0)
    assert_same(params_of(b), params_of(a))
    assert loss(b) > loss(model())


def test_maximize_matches_torch_sgd_before_the_first_pair():
    """Before its first curvature pair MomentumLBFGS is SGD with momentum and weight decay."""
    a, b = model(), model()
    opt_a = MomentumLBFGS(a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                          update_period=50, maximize=True)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                            maximize=True)
    train(opt_a, a, 5)
    train(opt_b, b, 5)
    assert_close_params(a, b)


@pytest.mark.parametrize("name", ALL)
def test_load_pre_hook_result_is_what_gets_loaded(name):
    m = model()
    opt = build(name, m)
    train(opt, m, 4)
    sd = opt.state_dict()
    key = {"MomentumLBFGS": "mlbfgs", "Neumann": "neumann"}.get(name) or opt.state_key
    # where the step count is saved: every optimizer keeps its global values in the first
    # parameter's entry
    saved_key, step = 0, {"Neumann": "neumann_step", "MomentumLBFGS": "mlbfgs_step"}.get(
        name, f"{key}_optimizer_step")
    target = build(name, model())

    def hook(optimizer, state_dict):
        edited = copy.deepcopy(state_dict)
        edited["state"][saved_key][step] = 1000
        return edited

    target.register_load_state_dict_pre_hook(hook)
    target.load_state_dict(sd)
    assert target.state[key]["step"] == 1000
    assert sd["state"][saved_key][step] == 4  # the caller's dict is untouched


@pytest.mark.parametrize("name", PARAMETER)
def test_per_group_lr_schedule(name):
    """A LambdaLR over two groups gives the run with the same LRs set by hand."""
    def groups(m):
        return [{"params": m[0].parameters(), "lr": 0.05}, {"params": m[2].parameters(),
                                                             "lr": 0.02}]
    a, b = model(), model()
    opt_a, opt_b = build(name, a, params=groups(a)), build(name, b, params=groups(b))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, [lambda k: 0.9**k, lambda k: 1.0 / (1 + k)])
    for k in range(6):
        opt_b.param_groups[0]["lr"], opt_b.param_groups[1]["lr"] = 0.05 * 0.9**k, 0.02 / (1 + k)
        train(opt_a, a, 1)
        train(opt_b, b, 1)
        sched.step()
    assert_close_params(a, b)
