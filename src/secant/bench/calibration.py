"""Equal-cost budgets (``docs/bench.md``, Equal-cost budgets).

Every optimizer gets the same cost: what the reference optimizer spends on the problem's epoch
budget. Costs per step are measured in a calibration phase that interleaves all contenders in
one process (process CPU time on CPU: the time this process ran, not the wall clock, so other
load on the machine changes it little; on a GPU the wall clock after ``torch.cuda.synchronize``),
then each run gets ``steps = cost budget / its cost per step`` steps: a cheap optimizer runs
more steps than an expensive one, and the runs themselves are step-budgeted, so the result
does not depend on how busy the machine is while they train.

    budget = E · S · c_ref        steps_o = floor(budget / c_o)

with ``E`` the epoch budget, ``S`` the steps per epoch, ``c_o`` the median cost per step of
optimizer ``o`` over the calibration rounds. Construction and K-BFGS's warm start (one pass of
forwards) are not counted: on the paper's problems they are below 1 % of a run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from secant.bench.problems import Dataset, Problem, seeded_model
from secant.bench.registry import OptimizerEntry


def clock(device: torch.device) -> Callable[[], float]:
    """Process CPU time on CPU; the wall clock, synchronised, on a GPU."""
    if device.type != "cuda":
        return time.process_time

    def synced() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return synced


def equal_cost_steps(costs: dict[str, float], reference: str, reference_steps: int
                     ) -> dict[str, int]:
    """Steps per optimizer for the cost of ``reference_steps`` steps of ``reference`` (at
    least one step each)."""
    if reference not in costs:
        raise ValueError(f"reference optimizer {reference!r} was not calibrated "
                         f"(calibrated: {', '.join(costs)})")
    budget = reference_steps * costs[reference]
    return {name: max(1, math.floor(budget / c)) for name, c in costs.items()}


def interleaved_costs(steppers: dict[str, Callable[[], None]], rounds: int, steps: int,
                      warmup: int, now: Callable[[], float]) -> dict[str, float]:
    """Median cost per step of each stepper: ``warmup`` untimed steps each, then ``rounds``
    rounds in which every stepper runs ``steps`` steps in turn (the order rotated each round,
    so no contender always follows the same one); a round's cost is its time / ``steps``."""
    names = list(steppers)
    for name in names:
        for _ in range(warmup):
            steppers[name]()
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = now()
            for _ in range(steps):
                steppers[name]()
            per_round[name].append((now() - t0) / steps)
    return {name: statistics.median(v) for name, v in per_round.items()}


def _stepper(problem: Problem, entry: OptimizerEntry, lr: float, knob: dict, data: Dataset,
             batch: int, device: torch.device, seed: int) -> Callable[[], None]:
    """One training step of ``entry`` on a fresh seeded model, on the next random minibatch."""
    model = seeded_model(problem, seed).to(device)
    model.train()
    opt = entry.make(model, lr, knob)
    x, y = data.x_train.to(device), None if data.y_train is None else data.y_train.to(device)
    gen = torch.Generator().manual_seed(seed)

    def step() -> None:
        idx = torch.randint(0, len(x), (batch,), generator=gen).to(device)
        xb, yb = x[idx], None if y is None else y[idx]

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = problem.loss(model, xb, yb)
            loss.backward()
            return loss

        opt.step(closure)

    return step


def calibrate(problem: Problem, contenders: Sequence[tuple[OptimizerEntry, float, dict]],
              data: Dataset, batch: int, device: torch.device, *, rounds: int = 7,
              steps: int = 5, warmup: int = 5, seed: int = 0) -> dict[str, float]:
    """Median cost per step (seconds) of each ``(entry, lr, knob)`` on ``problem``, measured
    interleaved in one process (:func:`interleaved_costs` with :func:`clock`)."""
    steppers = {entry.name: _stepper(problem, entry, lr, knob, data, batch, device, seed)
                for entry, lr, knob in contenders}
    return interleaved_costs(steppers, rounds, steps, warmup, clock(device))
