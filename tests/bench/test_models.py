"""Models of the benchmark problems."""

import torch
from torch import nn

from secant.bench import models as M


def test_paper_autoencoder_parameter_counts():
    # the K-BFGS paper's counts (docs/bench.md, Problems)
    assert M.count_parameters(M.autoencoder(M.CURVES_WIDTHS)) == 842_340
    assert M.count_parameters(M.autoencoder(M.MNIST_WIDTHS)) == 2_837_314


def test_autoencoder_code_and_output_layers_are_linear():
    net = M.autoencoder((8, 4, 2, 4, 8))
    kinds = [type(m).__name__ for m in net]
    # Linear ReLU Linear(code, no ReLU) Linear ReLU Linear(output)
    assert kinds == ["Linear", "ReLU", "Linear", "Linear", "ReLU", "Linear"]


def test_quadratic_model_loss_by_hand():
    h = torch.diag(torch.tensor([1.0, 4.0]))
    m = M.QuadraticModel(h, init=1.0)
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    # 0.5 * (1 + 4) = 2.5 ; 0.5 * (0 + 4 * 1) = 2
    assert torch.allclose(m(x), torch.tensor([2.5, 2.0]))


def test_cifar_models_shapes_and_layers():
    x = torch.randn(2, 3, 32, 32)
    for net in (M.ResNet18(), M.SmallViT()):
        assert net(x).shape == (2, 10)
    stem = M.ResNet18().stem[0]
    assert isinstance(stem, nn.Conv2d) and stem.kernel_size == (3, 3) and stem.stride == (1, 1)
