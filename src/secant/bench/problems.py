"""Benchmark problems, in the spirit of AlgoPerf's workload interface: each bundles its data,
model, loss, evaluation sizes, default batch size, a budget in epochs and a target loss
(``docs/bench.md``, Problems).

The loss of every problem is a mean over examples of a per-example loss (for the autoencoders
the sigmoid binary cross-entropy *summed over pixels*, as in the K-BFGS paper, without the
paper's ½·1e-5‖θ‖² term). A target is a training loss measured on a fixed evaluation subset of
the training set; steps-to-target is the step of the first evaluation at or below it. Targets
come from :mod:`secant.bench.tuned`, written by ``secant tune`` by one rule (``docs/bench.md``,
Targets); a problem that has not been tuned has no target.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from secant.bench import data as D
from secant.bench import models as M
from secant.bench.data import BenchError
from secant.bench.tuned import TUNED


@dataclass
class Dataset:
    x_train: Tensor
    x_test: Tensor
    y_train: Tensor | None = None  # None for autoencoders and the quadratic (target = input)
    y_test: Tensor | None = None


def bce_sum(logits: Tensor, x: Tensor) -> Tensor:
    """Sigmoid binary cross-entropy summed over pixels, per example."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)


@dataclass
class Problem:
    name: str
    description: str
    kind: str  # "autoencoder", "classifier" or "quadratic"
    batch_size: int
    budget_epochs: float  # the default budget: the regime the papers study, or what fits
    eval_train: int  # examples of the fixed training subset evaluated during the run
    eval_test: int
    load: Callable[[str | None, bool], Dataset]
    build: Callable[[], nn.Module]
    final_eval_cap: int | None = None  # None: the final evaluation uses the whole sets
    layer_optimizers: bool = True  # False where the model has no Linear/Conv2d weight layers
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def per_example_loss(self, model: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
        out = model(x)
        if self.kind == "autoencoder":
            return bce_sum(out, x)
        if self.kind == "classifier":
            return F.cross_entropy(out, y, reduction="none")
        return out  # the quadratic model returns per-example losses

    def loss(self, model: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
        return self.per_example_loss(model, x, y).mean()

    @torch.no_grad()
    def trivial_loss(self, data: Dataset) -> float | None:
        """Mean loss over the training set of the best input-independent predictor: the
        per-pixel mean image (autoencoder) or the class frequencies (classifier); ``None`` for
        the quadratic."""
        if self.kind == "autoencoder":
            p = data.x_train.double().mean(0).clamp(1e-6, 1 - 1e-6)
            return float(bce_sum(torch.logit(p).expand_as(data.x_train),
                                 data.x_train.double()).mean())
        if self.kind == "classifier":
            q = torch.bincount(data.y_train).double() / len(data.y_train)
            q = q[q > 0]
            return float(-(q * q.log()).sum())
        return None

    @property
    def target(self) -> float | None:
        entry = TUNED.get("targets", {}).get(self.name)
        return None if entry is None else float(entry["loss"])

    @property
    def target_note(self) -> str:
        entry = TUNED.get("targets", {}).get(self.name)
        if entry is None:
            return "no target: this problem has not been tuned (secant tune)"
        return str(entry["how"])


@functools.lru_cache(maxsize=2)
def _curves(seed: int = 0) -> Dataset:
    x_train, x_test = D.curves_dataset(seed)
    return Dataset(x_train, x_test)


def _load_curves(data_dir: str | None, synthetic: bool) -> Dataset:
    return _curves(0)


def _load_mnist(data_dir: str | None, synthetic: bool) -> Dataset:
    x_train, x_test = D.load_mnist(data_dir)
    return Dataset(x_train, x_test)


def _load_digits_ae(data_dir: str | None, synthetic: bool) -> Dataset:
    x_train, _, x_test, _ = D.load_digits_split()
    return Dataset(x_train, x_test)


def _load_digits_clf(data_dir: str | None, synthetic: bool) -> Dataset:
    x_train, y_train, x_test, y_test = D.load_digits_split()
    return Dataset(x_train, x_test, y_train, y_test)


_QUAD = functools.lru_cache(maxsize=1)(D.quadratic_deep)


def _load_quadratic(data_dir: str | None, synthetic: bool) -> Dataset:
    _, x_train, x_test = _QUAD()
    return Dataset(x_train, x_test)


def _load_mnist1d(data_dir: str | None, synthetic: bool) -> Dataset:
    x_train, y_train, x_test, y_test = D.load_mnist1d()
    return Dataset(x_train, x_test, y_train, y_test)


def _load_cifar(data_dir: str | None, synthetic: bool) -> Dataset:
    if synthetic:
        x_train, y_train, x_test, y_test = D.synthetic_cifar()
    else:
        x_train, y_train, x_test, y_test = D.load_cifar10(data_dir)
    return Dataset(x_train, x_test, y_train, y_test)


PROBLEMS: dict[str, Problem] = {}


def _add(p: Problem) -> None:
    PROBLEMS[p.name] = p


_add(Problem(
    "curves", "CURVES-like images (our generator) + the K-BFGS paper's 13-layer autoencoder "
    "(842,340 params), pixel-summed sigmoid BCE", "autoencoder", batch_size=1000,
    budget_epochs=100, eval_train=4000, eval_test=2000, load=_load_curves,
    build=lambda: M.autoencoder(M.CURVES_WIDTHS),
    notes="20,000 train / 10,000 test generated with seed 0 (secant.bench.data.curves_images); "
    "losses are not comparable with published CURVES numbers."))
_add(Problem(
    "mnist", "local MNIST IDX files + the paper's 784-1000-500-250-30 autoencoder "
    "(2,837,314 params), pixel-summed sigmoid BCE", "autoencoder", batch_size=1000,
    budget_epochs=120, eval_train=5000, eval_test=5000, load=_load_mnist,
    build=lambda: M.autoencoder(M.MNIST_WIDTHS),
    notes="needs --data-dir with train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]."))
_add(Problem(
    "digits", "scikit-learn 8x8 digits + a 64-32-16-8-16-32-64 autoencoder, pixel-summed "
    "sigmoid BCE", "autoencoder", batch_size=100, budget_epochs=40, eval_train=1297,
    eval_test=500, load=_load_digits_ae, build=lambda: M.autoencoder((64, 32, 16, 8, 16, 32, 64)),
    notes="1,297 train / 500 test (seeded split of the bundled 1,797 images)."))
_add(Problem(
    "digits-clf", "scikit-learn 8x8 digits + a 64-128-64-10 ReLU classifier, cross-entropy",
    "classifier", batch_size=100, budget_epochs=40, eval_train=1297, eval_test=500,
    load=_load_digits_clf, build=lambda: M.mlp((64, 128, 64, 10))))
_add(Problem(
    "mnist1d", "MNIST-1D (procedural, the mnist1d package; 40-sample signals, 10 classes) + a "
    "40-256-128-10 ReLU classifier, cross-entropy", "classifier", batch_size=100,
    budget_epochs=40, eval_train=4000, eval_test=1000, load=_load_mnist1d,
    build=lambda: M.mlp((40, 256, 128, 10)),
    notes="4,000 train / 1,000 test generated by mnist1d.data.make_dataset with its default "
    "arguments (seed 42); no download."))
_add(Problem(
    "quadratic", "noisy ill-conditioned 100-d quadratic like DeepOBS quadratic_deep "
    "(eigenvalues 90% in [0,1], 10% in [30,60])", "quadratic", batch_size=128,
    budget_epochs=10, eval_train=1000, eval_test=1000, load=_load_quadratic,
    build=lambda: M.QuadraticModel(_QUAD()[0]), layer_optimizers=False,
    notes="the model is a bare parameter vector, so layer optimizers (kfac, kbfgs, kbfgsl) do "
    "not apply; the expected loss is minimised at θ = 0 with value ½ tr(H)."))
_add(Problem(
    "cifar10", "CIFAR-10 (local binary batches, or --synthetic) + ResNet-18 with a 3x3 "
    "stride-1 stem (11.2M params), cross-entropy", "classifier", batch_size=128,
    budget_epochs=150, eval_train=500, eval_test=500, final_eval_cap=2000,
    load=_load_cifar, build=M.ResNet18,
    notes="needs --data-dir with data_batch_1..5.bin and test_batch.bin, or --synthetic "
    "(random CIFAR-shaped data, for throughput only). Slow on CPU: use --device cuda."))
_add(Problem(
    "cifar10-vit", "CIFAR-10 (local binary batches, or --synthetic) + a small ViT (4x4 patches, "
    "dim 128, depth 4, 0.55M params), cross-entropy", "classifier", batch_size=128,
    budget_epochs=50, eval_train=500, eval_test=500, final_eval_cap=2000,
    load=_load_cifar, build=M.SmallViT, notes="data as for cifar10."))


def get_problem(name: str) -> Problem:
    if name not in PROBLEMS:
        raise BenchError(f"unknown problem {name!r}; expected one of: {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def seeded_model(problem: Problem, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return problem.build()
