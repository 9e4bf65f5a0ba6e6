"""The optimizer registry: availability follows the installed packages at run time; every
entry builds and steps; the new baselines against independent references."""

import math

import pytest
import torch
from torch import nn

import secant
from secant.bench import baselines
from secant.bench.data import BenchError
from secant.bench.problems import bce_sum, get_problem
from secant.bench.registry import OPTIMIZERS, available_optimizers, baseline_names, get_optimizer


def test_registry_names_and_families():
    assert list(OPTIMIZERS) == ["sgd", "sgd-norm", "adam", "adamw", "muon", "soap", "mlbfgs",
                                "kfac", "kbfgs", "kbfgsl", "neumann"]
    assert baseline_names() == ["sgd", "sgd-norm", "adam", "adamw", "muon", "soap"]
    assert {"sgd", "sgd-norm", "adam", "adamw", "muon", "mlbfgs"} <= set(available_optimizers())


def test_entry_lights_up_only_when_class_exists(monkeypatch):
    monkeypatch.delattr(secant, "KFAC", raising=False)
    assert "kfac" not in available_optimizers()
    with pytest.raises(BenchError, match="not available"):
        get_optimizer("kfac")

    class FakeKFAC(torch.optim.SGD):
        def __init__(self, model, lr, **hyper):
            self.hyper = hyper
            super().__init__(model.parameters(), lr=lr)

    monkeypatch.setattr(secant, "KFAC", FakeKFAC, raising=False)
    opt = get_optimizer("kfac").make(nn.Linear(2, 2), lr=0.5, knob={"damping": 0.1})
    assert isinstance(opt, FakeKFAC) and opt.param_groups[0]["lr"] == 0.5
    assert opt.hyper == {"inverse_method": "cholesky", "damping": 0.1}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_available_entry_builds_and_steps(name):
    entry = OPTIMIZERS[name]
    if not entry.available:
        pytest.skip(f"{name} is not installed here")
    net = _net()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = entry.make(net, entry.default_lr, {} if entry.knob is None
                     else {entry.knob.name: entry.knob.default})
    if entry.warm_start:
        opt.warm_start([(x,)])
    before = [p.detach().clone() for p in net.parameters()]

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
    assert math.isfinite(float(loss.detach()))
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_normalised_sgd_matches_sgd_on_the_normalised_gradient():
    net, ref = _net(), _net()
    x = torch.randn(16, 6)
    opt = baselines.NormalisedSGD(net.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
        ref_opt.zero_grad()
        ref(x).pow(2).sum().backward()
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters()))
        for p in ref.parameters():
            p.grad /= norm
        ref_opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_muon_gets_hidden_matrices_adamw_the_rest():
    net = _net()
    opt = baselines.muon_with_adamw(net, lr=1e-2, weight_decay=0.1)
    muon, adamw = opt.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_ids == {id(net[0].weight), id(net[2].weight)}  # not the output layer
    adamw_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert adamw_ids == {id(p) for p in net.parameters()} - muon_ids
    assert muon.param_groups[0]["weight_decay"] == adamw.param_groups[0]["weight_decay"] == 0.1


def test_autoencoder_loss_is_pixel_summed_bce():
    # a zero logit costs log 2 per pixel whatever the target: 784 log 2 per image
    x = torch.rand(5, 784)
    assert torch.allclose(bce_sum(torch.zeros(5, 784), x), torch.full((5,), 784 * math.log(2)))
    p = get_problem("curves")
    model = nn.Linear(784, 784)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    assert p.loss(model, x, None).item() == pytest.approx(784 * math.log(2), rel=1e-6)


def test_register_variant_adds_options_at_the_base_settings(monkeypatch):
    """A variant builds the base's optimizer with the extra options, at the base's tuned lr and
    knob for the problem; the registry is restored afterwards."""
    from secant.bench import registry, tuned_table

    monkeypatch.setattr(registry, "OPTIMIZERS", dict(registry.OPTIMIZERS))
    name = registry.register_variant("kbfgsl", "kbfgsl-test", "curves", dense_hg=True,
                                     history_size=7)
    base, variant = get_optimizer("kbfgsl"), get_optimizer(name)
    lr, knob, _ = tuned_table.package().settings(base, "curves")
    assert (variant.default_lr, variant.knob.default) == (lr, knob["damping"])
    assert "dense_hg=True" in variant.description
    opt = variant.make(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), 0.05,
                       {"damping": 0.2})
    assert isinstance(opt, secant.KBFGSL) and opt.dense_hg and opt.history_size == 7
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["damping"] == 0.2
    assert name not in OPTIMIZERS  # the module-level table was not touched
