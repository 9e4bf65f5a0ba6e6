"""Named suites for ``secant bench --suite`` (``docs/bench.md``, Suites): which problems, at
which budget in epochs, with how many seeds. A suite's budgets override the problems' own."""

from __future__ import annotations

from dataclasses import dataclass

from secant.bench.data import BenchError


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    epochs: dict[str, float]  # problem -> budget in epochs
    seeds: int
    needs_data: tuple[str, ...] = ()  # run only with --data-dir (real files)
    synthetic_without_data: tuple[str, ...] = ()  # CIFAR-shaped random data without --data-dir
    optimizers: tuple[str, ...] = ()  # the suite's contenders; empty: every available one

    def problems(self, data_dir: str | None) -> list[str]:
        return [p for p in self.epochs if data_dir is not None or p not in self.needs_data]


SUITES: dict[str, Suite] = {}


def _add(s: Suite) -> None:
    SUITES[s.name] = s


_add(Suite("quick", "what `make bench` runs: small real and synthetic problems whose verdict "
           "was checked stable across 3 seeds and machine load; within 10 minutes on 2 CPU "
           "cores", {"digits-clf": 10, "mnist1d": 10, "digits": 20, "digits-cnn": 10}, seeds=3))
_add(Suite("paper-ae", "the K-BFGS paper's autoencoder comparison at batch 1000 and its "
           "contenders (SGD-momentum, Adam, K-FAC, K-BFGS, K-BFGS(L)): CURVES-like data (100 "
           "epochs), and MNIST (120 epochs, the paper's K-BFGS run) with --data-dir",
           {"curves": 100, "mnist": 120}, seeds=3, needs_data=("mnist",),
           optimizers=("sgd", "adam", "kfac", "kbfgs", "kbfgsl")))
_add(Suite("paper-cnn", "the mL-BFGS paper's CIFAR workloads: ResNet-18 (150 epochs) and a "
           "small ViT (50 epochs); real CIFAR-10 with --data-dir, else synthetic CIFAR-shaped "
           "data (throughput only)", {"cifar10": 150, "cifar10-vit": 50}, seeds=3,
           synthetic_without_data=("cifar10", "cifar10-vit")))
_add(Suite("all", "every suite above", {**SUITES["quick"].epochs, **SUITES["paper-ae"].epochs,
                                        **SUITES["paper-cnn"].epochs}, seeds=3,
           needs_data=("mnist",), synthetic_without_data=("cifar10", "cifar10-vit")))


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise BenchError(f"unknown suite {name!r}; expected one of: {', '.join(SUITES)}")
    return SUITES[name]
