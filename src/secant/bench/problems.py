"""Benchmark problems, in the spirit of AlgoPerf's workload interface: a :class:`Problem`
bundles a model builder, data, a per-example loss, a batch size, a budget in epochs and
optionally a target loss (``docs/bench.md``, Problems and Your own problem). The built-in
problems are in :data:`PROBLEMS`; a user's own problem is a :class:`Problem` their function
returns (``secant bench --problem FILE.py:FUNCTION``).

The loss of every problem is a mean over examples of a per-example loss (for the autoencoders
the sigmoid binary cross-entropy *summed over pixels*, as in the K-BFGS paper, without the
paper's ½·1e-5‖θ‖² term). A target is a training loss measured on a fixed evaluation subset of
the training set; steps-to-target is the step of the first evaluation at or below it. Targets
come from the problem's definition or from a tuning table written by ``secant tune`` by one
rule (``docs/bench.md``, Targets); a problem with neither has no target.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import default_collate

from secant.bench import data as D
from secant.bench import models as M
from secant.bench.data import BenchError, describe


@dataclass(eq=False)
class Dataset:
    """A problem's data, in memory: inputs and, for supervised problems, targets (the first
    dimension indexes examples). ``y_train`` / ``y_test`` are ``None`` where the loss needs
    only the input (autoencoders, the quadratic)."""

    x_train: Tensor
    x_test: Tensor
    y_train: Tensor | None = None
    y_test: Tensor | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, Tensor) or x.ndim == 0 or len(x) == 0:
                raise BenchError(f"Dataset: x_{split} must be a tensor with at least one "
                                 f"example, got {_what(x)}")
            if y is not None and (not isinstance(y, Tensor) or y.ndim == 0 or len(y) != len(x)):
                raise BenchError(f"Dataset: y_{split} must be None or a tensor with one row per "
                                 f"example of x_{split} ({len(x)}), got {_what(y)}")
        if (self.y_train is None) != (self.y_test is None):
            raise BenchError("Dataset: give both y_train and y_test, or neither")

    @classmethod
    def from_torch(cls, train, test) -> Dataset:
        """From two map-style ``torch.utils.data.Dataset`` objects (e.g. ``TensorDataset``, a
        torchvision dataset with a tensor transform) whose items are ``(input, target)`` pairs
        or inputs alone: every item is read once and stacked in memory."""
        def stack(ds) -> tuple[Tensor, Tensor | None]:
            batch = default_collate([ds[i] for i in range(len(ds))])
            if isinstance(batch, Tensor):
                return batch, None
            return batch[0], (batch[1] if len(batch) > 1 else None)

        (x_train, y_train), (x_test, y_test) = stack(train), stack(test)
        return cls(x_train, x_test, y_train, y_test)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _what(v: object) -> str:
    return f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__


def bce_sum(logits: Tensor, x: Tensor) -> Tensor:
    """Sigmoid binary cross-entropy summed over pixels, per example."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)


CRITERIA: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    "bce_sum": bce_sum,  # an autoencoder's target is its input
    "output": lambda out, target: out,  # the model itself returns per-example losses
}


@dataclass(kw_only=True, eq=False)
class Problem:
    """A benchmark problem: what ``secant bench`` and ``secant tune`` train, and what a
    user's ``--problem FILE.py:FUNCTION`` function returns (every field by keyword).

    Fields:
        name: the problem's name in results, reports and tuning tables (``secant tune``
            stores its choices under it; ``secant bench --tuned`` looks them up by it).
        build: a function of no arguments returning a fresh ``nn.Module``; each run seeds
            torch (``torch.manual_seed(seed)``) and then calls it.
        data: a :class:`Dataset` (tensors in memory; :meth:`Dataset.from_torch` converts
            torch datasets), or a loader ``(data_dir, synthetic) -> Dataset`` called once
            before training with ``--data-dir`` and ``--synthetic`` (the built-in problems
            read their files this way).
        criterion: the per-example loss of the model's output: ``"cross_entropy"`` (logits
            against integer labels ``y``), ``"bce_sum"`` (sigmoid binary cross-entropy of
            logits against the input, summed over features: autoencoders), ``"output"``
            (the model returns per-example losses itself), or a function
            ``(output, target) -> losses`` of shape ``(batch,)``, ``target`` being ``y``, or
            the input ``x`` when the data has no ``y`` (``nn.CrossEntropyLoss(reduction=
            "none")`` is one). The training loss is its mean over the minibatch.
        batch_size: the minibatch size (``--batch-size`` overrides it).
        budget_epochs: the default budget of a run, in epochs (``--epochs`` or
            ``--budget-seconds`` override it).
        target: a training loss to reach, set in advance; ``None``: the target of the tuning
            table in use (``secant tune``), if any. It is compared with the loss on the
            evaluation subset of the training set.
        description: one line for the report.
        notes: anything else the report should say about the problem.
        eval_train: examples of the fixed training subset evaluated during a run (all of
            them when the training set is smaller); steps to target are measured on it.
        eval_test: the first ``eval_test`` test examples, evaluated alongside.
        final_eval_cap: examples of each set in the final evaluation (``None``: all).

    K-FAC, K-BFGS and K-BFGS(L) precondition ``nn.Linear`` and ``nn.Conv2d`` layers: they run
    only where the model has such layers (:attr:`layer_optimizers`).
    """

    name: str
    build: Callable[[], nn.Module]
    data: Dataset | Callable[[str | None, bool], Dataset]
    criterion: str | Callable[[Tensor, Tensor], Tensor]
    batch_size: int
    budget_epochs: float
    target: float | None = None
    description: str = "a user-defined problem"
    notes: str = ""
    eval_train: int = 1000
    eval_test: int = 1000
    final_eval_cap: int | None = None

    def __post_init__(self) -> None:
        def bad(what: str) -> BenchError:
            return BenchError(f"Problem {self.name!r}: {what}")

        if not isinstance(self.name, str) or not self.name.strip() or "," in self.name:
            raise BenchError(f"Problem: name must be a non-empty string without commas, got "
                             f"{self.name!r}")
        if not callable(self.build):
            raise bad(f"build must be a function returning an nn.Module, got "
                      f"{type(self.build).__name__}")
        if not (isinstance(self.data, Dataset) or callable(self.data)):
            raise bad(f"data must be a Dataset or a loader (data_dir, synthetic) -> Dataset, "
                      f"got {type(self.data).__name__}")
        if not (callable(self.criterion) or self.criterion in CRITERIA):
            raise bad(f"criterion must be one of {', '.join(CRITERIA)} or a function "
                      f"(output, target) -> per-example losses, got {self.criterion!r}")
        for name in ("batch_size", "eval_train", "eval_test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"{name} must be an integer >= 1, got {value!r}")
        if not _finite(self.budget_epochs) or self.budget_epochs <= 0:
            raise bad(f"budget_epochs must be a finite number > 0, got {self.budget_epochs!r}")
        if self.target is not None and not _finite(self.target):
            raise bad(f"target must be None or a finite number, got {self.target!r}")

    def load(self, data_dir: str | None = None, synthetic: bool = False) -> Dataset:
        """The problem's data (its loader called with ``data_dir`` and ``synthetic``)."""
        if isinstance(self.data, Dataset):
            return self.data
        try:
            data = self.data(data_dir, synthetic)
        except BenchError:
            raise
        except Exception as exc:
            raise BenchError(f"problem {self.name!r}: loading its data raised "
                             f"{describe(exc)}") from None
        if not isinstance(data, Dataset):
            raise BenchError(f"problem {self.name!r}: its data loader returned "
                             f"{type(data).__name__}, expected a secant.bench.Dataset")
        return data

    def per_example_loss(self, model: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
        criterion = CRITERIA.get(self.criterion) if isinstance(self.criterion, str) else (
            self.criterion)
        return criterion(model(x), x if y is None else y)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
        return self.per_example_loss(model, x, y).mean()

    @functools.cached_property
    def layer_optimizers(self) -> bool:
        """Whether the model has ``nn.Linear`` or ``nn.Conv2d`` layers, which K-FAC, K-BFGS
        and K-BFGS(L) precondition (the quadratic's bare parameter vector has none)."""
        return any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in self.build().modules())

    def check(self, data: Dataset) -> None:
        """Before any training: the model builds, runs on two training examples, and the
        criterion gives one loss per example; else :class:`BenchError` says what failed."""
        n = min(2, len(data.x_train))
        y = None if data.y_train is None else data.y_train[:n]
        try:
            with torch.no_grad():
                losses = self.per_example_loss(self.build().eval(), data.x_train[:n], y)
        except Exception as exc:
            raise BenchError(f"problem {self.name!r}: the loss of {n} training examples raised "
                             f"{describe(exc)}") from None
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (n,):
            raise BenchError(f"problem {self.name!r}: the criterion returned {_what(losses)} "
                             f"for {n} examples; expected one loss per example, shape ({n},) "
                             "(a torch loss needs reduction='none')")

    @torch.no_grad()
    def trivial_loss(self, data: Dataset) -> float | None:
        """Mean loss over the training set of the best input-independent predictor: the
        per-pixel mean image (``bce_sum``) or the class frequencies (``cross_entropy``);
        ``None`` for other criteria."""
        if self.criterion == "bce_sum":
            p = data.x_train.double().mean(0).clamp(1e-6, 1 - 1e-6)
            return float(bce_sum(torch.logit(p).expand_as(data.x_train),
                                 data.x_train.double()).mean())
        if self.criterion == "cross_entropy":
            q = torch.bincount(data.y_train).double() / len(data.y_train)
            q = q[q > 0]
            return float(-(q * q.log()).sum())
        return None


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


def _load_digits_images(data_dir: str | None, synthetic: bool) -> Dataset:
    x_train, y_train, x_test, y_test = D.load_digits_split()

    def images(x: Tensor) -> Tensor:  # (n, 64) in [0, 1] -> (n, 1, 16, 16), bilinear
        return F.interpolate(x.view(-1, 1, 8, 8), size=16, mode="bilinear")

    return Dataset(images(x_train), images(x_test), y_train, y_test)


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
    name="curves", description="CURVES-like images (our generator) + the K-BFGS paper's "
    "13-layer autoencoder (842,340 params), pixel-summed sigmoid BCE", criterion="bce_sum",
    batch_size=1000, budget_epochs=100, eval_train=4000, eval_test=2000, data=_load_curves,
    build=lambda: M.autoencoder(M.CURVES_WIDTHS),
    notes="20,000 train / 10,000 test generated with seed 0 (secant.bench.data.curves_images); "
    "losses are not comparable with published CURVES numbers."))
_add(Problem(
    name="mnist", description="local MNIST IDX files + the paper's 784-1000-500-250-30 "
    "autoencoder (2,837,314 params), pixel-summed sigmoid BCE", criterion="bce_sum",
    batch_size=1000, budget_epochs=120, eval_train=5000, eval_test=5000, data=_load_mnist,
    build=lambda: M.autoencoder(M.MNIST_WIDTHS),
    notes="needs --data-dir with train-images-idx3-ubyte and t10k-images-idx3-ubyte (each "
    "optionally .gz, .bz2, .xz or .zip)."))
_add(Problem(
    name="digits", description="scikit-learn 8x8 digits + a 64-32-16-8-16-32-64 autoencoder, "
    "pixel-summed sigmoid BCE", criterion="bce_sum", batch_size=100, budget_epochs=40,
    eval_train=1297, eval_test=500, data=_load_digits_ae,
    build=lambda: M.autoencoder((64, 32, 16, 8, 16, 32, 64)),
    notes="1,297 train / 500 test (seeded split of the bundled 1,797 images)."))
_add(Problem(
    name="digits-clf", description="scikit-learn 8x8 digits + a 64-128-64-10 ReLU classifier, "
    "cross-entropy", criterion="cross_entropy", batch_size=100, budget_epochs=40,
    eval_train=1297, eval_test=500, data=_load_digits_clf,
    build=lambda: M.mlp((64, 128, 64, 10))))
_add(Problem(
    name="digits-cnn", description="scikit-learn 8x8 digits upsampled to 16x16 + a small ResNet "
    "with BatchNorm (3x3 stem, one basic block per stage of 16/32/64 channels, 1x1-conv "
    "shortcuts, linear head; 77,754 params), cross-entropy", criterion="cross_entropy",
    batch_size=100, budget_epochs=10, eval_train=500, eval_test=200,
    data=_load_digits_images, build=M.small_resnet,
    notes="the split of digits-clf; images upsampled bilinearly (16x16 rather than 32x32 keeps "
    "a K-BFGS run of the quick suite near 20 s on one core: at 32x32 a step costs 5x more); "
    "evaluated on 500 training and 200 test examples during a run (a forward pass over all "
    "1,797 at every evaluation would cost twice the training)."))
_add(Problem(
    name="mnist1d", description="MNIST-1D (procedural, the mnist1d package; 40-sample "
    "signals, 10 classes) + a 40-256-128-10 ReLU classifier, cross-entropy",
    criterion="cross_entropy", batch_size=100, budget_epochs=40, eval_train=4000,
    eval_test=1000, data=_load_mnist1d, build=lambda: M.mlp((40, 256, 128, 10)),
    notes="4,000 train / 1,000 test generated by mnist1d.data.make_dataset with its default "
    "arguments (seed 42); no download."))
_add(Problem(
    name="quadratic", description="noisy ill-conditioned 100-d quadratic like DeepOBS "
    "quadratic_deep (eigenvalues 90% in [0,1], 10% in [30,60])", criterion="output",
    batch_size=128, budget_epochs=10, data=_load_quadratic,
    build=lambda: M.QuadraticModel(_QUAD()[0]),
    notes="the model is a bare parameter vector, so layer optimizers (kfac, kbfgs, kbfgsl) do "
    "not apply; the expected loss is minimised at θ = 0 with value ½ tr(H)."))
_add(Problem(
    name="cifar10", description="CIFAR-10 (local binary batches, or --synthetic) + ResNet-18 "
    "with a 3x3 stride-1 stem (11.2M params), cross-entropy", criterion="cross_entropy",
    batch_size=128, budget_epochs=150, eval_train=500, eval_test=500, final_eval_cap=2000,
    data=_load_cifar, build=M.ResNet18,
    notes="needs --data-dir with data_batch_1..5.bin and test_batch.bin, or --synthetic "
    "(random CIFAR-shaped data, for throughput only). Slow on CPU: use --device cuda."))
_add(Problem(
    name="cifar10-vit", description="CIFAR-10 (local binary batches, or --synthetic) + a small "
    "ViT (4x4 patches, dim 128, depth 4, 0.55M params), cross-entropy",
    criterion="cross_entropy", batch_size=128, budget_epochs=50, eval_train=500,
    eval_test=500, final_eval_cap=2000, data=_load_cifar, build=M.SmallViT,
    notes="data as for cifar10."))


def get_problem(name: str) -> Problem:
    """The built-in problem called ``name``."""
    if name not in PROBLEMS:
        raise BenchError(f"unknown problem {name!r}; expected one of: {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def seeded_model(problem: Problem, seed: int) -> nn.Module:
    """A fresh model of ``problem``, built after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return problem.build()
