"""The optimizer registry: availability follows the secant package at run time."""

import math

import pytest
import torch

import secant
from secant.bench.data import BenchError
from secant.bench.problems import bce_sum, get_problem
from secant.bench.registry import OPTIMIZERS, available_optimizers, get_optimizer


def test_registry_names_and_baselines_always_available():
    assert list(OPTIMIZERS) == ["sgd", "adam", "mlbfgs", "kfac", "kbfgs", "kbfgsl", "neumann"]
    assert {"sgd", "adam", "mlbfgs"} <= set(available_optimizers())


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
    assert "kfac" in available_optimizers()
    opt = get_optimizer("kfac").make(torch.nn.Linear(2, 2), lr=0.5)
    assert isinstance(opt, FakeKFAC) and opt.param_groups[0]["lr"] == 0.5
    assert opt.hyper == OPTIMIZERS["kfac"].hyper  # built from the model with fixed hyper


def test_param_entry_builds_from_parameters():
    lin = torch.nn.Linear(3, 1)
    opt = get_optimizer("sgd").make(lin, lr=0.1)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


def test_autoencoder_loss_is_pixel_summed_bce():
    # a zero logit costs log 2 per pixel whatever the target: 784 log 2 per image
    x = torch.rand(5, 784)
    assert torch.allclose(bce_sum(torch.zeros(5, 784), x), torch.full((5,), 784 * math.log(2)))
    p = get_problem("curves")
    model = torch.nn.Linear(784, 784)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    assert p.loss(model, x, None).item() == pytest.approx(784 * math.log(2), rel=1e-6)
