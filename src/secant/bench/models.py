"""Models of the benchmark problems: the K-BFGS paper's deep autoencoders, a small MLP, ResNets
(the quick suite's small one, CIFAR's ResNet-18) and a small ViT. Every weight layer is an
``nn.Linear`` or ``nn.Conv2d`` so the layer optimizers (K-FAC, K-BFGS) can hook them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

CURVES_WIDTHS = (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784)
MNIST_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def autoencoder(widths: tuple[int, ...] | list[int]) -> nn.Sequential:
    """The paper's deep autoencoder (docs/bench.md, Problems): all layers ``nn.Linear``, ReLU after
    every hidden layer except the code layer (the narrowest, linear) and the output layer
    (linear logits; the loss applies the sigmoid)."""
    code = min(range(len(widths)), key=lambda i: widths[i])
    layers: list[nn.Module] = []
    for i in range(1, len(widths)):
        layers.append(nn.Linear(widths[i - 1], widths[i]))
        if i != code and i != len(widths) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp(widths: tuple[int, ...] | list[int]) -> nn.Sequential:
    """A ReLU multilayer perceptron with a linear last layer."""
    layers: list[nn.Module] = []
    for i in range(1, len(widths)):
        layers.append(nn.Linear(widths[i - 1], widths[i]))
        if i != len(widths) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class QuadraticModel(nn.Module):
    """A single parameter vector θ; the loss of an example x is ``½ (θ − x)ᵀ H (θ − x)``.
    θ starts at ``init`` (all entries equal), a fixed start so runs differ only by batch order."""

    def __init__(self, hessian: Tensor, init: float = 3.0) -> None:
        super().__init__()
        self.register_buffer("hessian", hessian)
        self.theta = nn.Parameter(torch.full((hessian.shape[0],), init))

    def forward(self, x: Tensor) -> Tensor:
        d = self.theta - x
        return 0.5 * ((d @ self.hessian) * d).sum(-1)  # per-example loss


# ---------------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet for small images: 3×3 stride-1 stem (no max-pool), one stage of ``depth`` basic
    blocks per entry of ``widths`` (the first stage at stride 1, the others starting at stride
    2, 1×1-conv shortcuts where the shape changes), global average pool, linear classifier."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], depth: int,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks += [BasicBlock(cin if j == 0 else cout, cout, 2 if i and not j else 1)
                       for j in range(depth)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def ResNet18(num_classes: int = 10) -> ResNet:
    """ResNet-18 for 32×32 RGB inputs: stages of 64/128/256/512 channels, two blocks each."""
    return ResNet(3, (64, 128, 256, 512), 2, num_classes)


def small_resnet() -> ResNet:
    """The quick suite's CNN for 16×16 grey images: stages of 16/32/64 channels, one block
    each (77,754 parameters)."""
    return ResNet(1, (16, 32, 64), 1)


# ---------------------------------------------------------------------------------- small ViT
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """A small Vision Transformer for 32×32 images: 4×4 patches (64 tokens) embedded by a
    linear layer, a class token, learned position embeddings, ``depth`` pre-norm blocks."""

    def __init__(self, num_classes: int = 10, dim: int = 128, depth: int = 4, heads: int = 4,
                 hidden: int = 256, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        tokens = (32 // patch) ** 2
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        b, p = x.shape[0], self.patch
        x = x.unfold(2, p, p).unfold(3, p, p)  # (b, 3, 8, 8, p, p)
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
        x = torch.cat([self.cls.expand(b, -1, -1), self.embed(x)], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
