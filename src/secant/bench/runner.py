"""One training run: an optimizer on a problem under a step (epoch) or wall-clock budget
(``docs/bench.md``, Budgets and divergence).

Every optimizer is driven the same way, with a closure (``closure()`` zeroes the gradients,
computes the minibatch loss, calls ``backward()`` and returns the loss; the step is
``loss = opt.step(closure)``), because K-BFGS evaluates the same minibatch twice per step.
The clock counts training only: building the optimizer and every whole step (batch selection,
forward, backward, update), and K-BFGS(L)'s warm start (one pass over the training data to
initialise A, as in the paper; capped at the run's own number of steps, so a run of a few
steps does not pay for a pass over CIFAR); evaluations are not counted. The median step time
leaves out the first steps (:func:`secant.bench.budgets.warmup_steps`); on a GPU every step
is timed after ``torch.cuda.synchronize``. A run stops as ``diverged`` by the rule of
:mod:`secant.bench.budgets`. An evaluation runs under
``torch.no_grad()`` and ``model.eval()``, and inside ``opt.undisplaced()`` when the optimizer
has it (the Neumann optimizer's evaluation weights).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from secant.bench import budgets, distributed
from secant.bench.problems import Dataset, Problem, seeded_model
from secant.bench.registry import OptimizerEntry
from secant.distributed import local


@dataclass
class RunConfig:
    problem: str
    optimizer: str
    lr: float
    lr_source: str
    seed: int
    batch_size: int
    budget_seconds: float | None  # exactly one of budget_seconds / epochs is set
    epochs: float | None
    device: str
    n_evals: int = 40
    knob: dict = field(default_factory=dict)  # the second hyperparameter, e.g. {"damping": 0.3}


def epoch_steps(n: int, batch: int) -> int:
    """Steps in one epoch of ``n`` examples at ``batch`` per step (a partial batch is dropped;
    at least one)."""
    return max(n // batch, 1)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of all tensors reachable from ``opt.state_dict()['state']``, each storage counted
    once; a ``DTensor`` counts its local shard (what this rank holds)."""
    seen: set[tuple[int, str]] = set()
    total = 0

    def walk(obj: object) -> None:
        nonlocal total
        if isinstance(obj, Tensor):
            st = local(obj).untyped_storage()
            key = (st.data_ptr(), str(obj.device))
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v)

    walk(opt.state_dict().get("state", {}))
    return total


@torch.no_grad()
def evaluate(problem: Problem, model: nn.Module, x: Tensor, y: Tensor | None,
             chunk: int = 2000) -> float:
    """Mean per-example loss over ``x`` (in chunks), as a float."""
    total = 0.0
    for lo in range(0, len(x), chunk):
        yb = None if y is None else y[lo : lo + chunk]
        total += float(problem.per_example_loss(model, x[lo : lo + chunk], yb).double().sum())
    return total / max(len(x), 1)


def _eval_context(opt: torch.optim.Optimizer | None):
    undisplaced = getattr(opt, "undisplaced", None)
    return undisplaced() if callable(undisplaced) else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_WARM = False


def _warm_up() -> None:
    """The first optimizer step of a process pays for torch's lazy imports (seconds); pay it
    once, outside every clock."""
    global _WARM
    if not _WARM:
        w = torch.zeros(2, requires_grad=True)
        for cls in (torch.optim.SGD, torch.optim.Adam):
            o = cls([w], lr=0.1)
            (w**2).sum().backward()
            o.step()
        _WARM = True


def run_one(problem: Problem, entry: OptimizerEntry, data: Dataset, cfg: RunConfig,
            progress: bool = True) -> dict:
    """Train and return a JSON-ready record: config, status (``ok``, ``diverged``, ``error``,
    ``not applicable``), evaluation curve, final losses, step times, optimizer-state bytes."""
    rec: dict = {"config": asdict(cfg), "status": "ok", "message": "", "curve": []}
    if entry.needs_layers and not problem.layer_optimizers:
        rec.update(status="not applicable",
                   message=f"{entry.name} needs Linear/Conv2d layers; {problem.name} has none")
        return rec
    _warm_up()
    device = torch.device(cfg.device)
    model = seeded_model(problem, cfg.seed).to(device)
    net = distributed.wrap(model)  # trained through DDP under torchrun, evaluated as is
    rec["parameters"] = sum(p.numel() for p in model.parameters())
    trivial = problem.trivial_loss(data)
    rec["trivial_loss"] = trivial
    x_tr, x_te = data.x_train.to(device), data.x_test.to(device)
    y_tr = None if data.y_train is None else data.y_train.to(device)
    y_te = None if data.y_test is None else data.y_test.to(device)
    n = len(x_tr)
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(1234))[: problem.eval_train]
    sub = sub.to(device)
    ev_tr = (x_tr[sub], None if y_tr is None else y_tr[sub])
    ev_te = (x_te[: problem.eval_test], None if y_te is None else y_te[: problem.eval_test])
    batch = min(cfg.batch_size, n)
    steps_per_epoch = epoch_steps(n, batch)
    total_steps = None if cfg.epochs is None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    opt = None
    train_time = 0.0
    step = 0
    step_times: list[float] = []

    def do_eval() -> tuple[float, float]:
        model.eval()
        with _eval_context(opt):
            tr = evaluate(problem, model, *ev_tr)
            te = evaluate(problem, model, *ev_te)
        model.train()
        rec["curve"].append({"step": step, "time": train_time, "train_loss": tr, "test_loss": te})
        return tr, te

    def fraction() -> float:
        if total_steps is not None:
            return step / total_steps
        return train_time / cfg.budget_seconds

    bar = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_steps if total_steps is not None else cfg.budget_seconds,
                   desc=f"{problem.name}/{entry.name} seed {cfg.seed}", file=sys.stderr,
                   unit="step" if total_steps is not None else "s", disable=not progress,
                   leave=True, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}{unit} [{elapsed}{postfix}]")
    except ImportError:  # tqdm is in the bench extra; runs work without it
        bar = None

    try:
        model.train()
        initial, _ = do_eval()
        rec["initial_train_loss"] = best = initial
        next_eval = 1
        t0 = time.perf_counter()
        opt = entry.make(net, cfg.lr, cfg.knob)
        if entry.warm_start:  # one pass, but never more batches than the run will train on
            with torch.no_grad():
                opt.warm_start(((x_tr[distributed.local_rows(torch.arange(lo, lo + batch))],)
                                for lo in range(0, n - batch + 1, batch)),
                               max_batches=total_steps)
        _sync(device)
        train_time += time.perf_counter() - t0
        perm = torch.randperm(n, generator=gen).to(device)
        pos = 0
        last_post = 0.0
        while fraction() < 1.0:
            t0 = time.perf_counter()
            if pos + batch > n:
                perm = torch.randperm(n, generator=gen).to(device)
                pos = 0
            idx = distributed.local_rows(perm[pos : pos + batch])
            pos += batch
            xb = x_tr[idx]
            yb = None if y_tr is None else y_tr[idx]

            def closure(xb: Tensor = xb, yb: Tensor | None = yb) -> Tensor:
                opt.zero_grad(set_to_none=True)
                loss = problem.loss(net, xb, yb)
                loss.backward()
                return loss

            out = opt.step(closure)
            _sync(device)
            dt = time.perf_counter() - t0
            loss_val = float(out.detach()) if out is not None else float("nan")
            loss_val, train_time = distributed.agree(loss_val, train_time + dt)
            step += 1
            step_times.append(dt)
            if bar is not None:
                bar.update(1 if total_steps is not None else
                           min(dt, max(cfg.budget_seconds - bar.n, 0.0)))
                if train_time - last_post > 0.5:
                    bar.set_postfix_str(f"loss {loss_val:.4g}")
                    last_post = train_time
            if not math.isfinite(loss_val):
                rec.update(status="diverged", message=f"non-finite minibatch loss at step {step}")
                break
            if fraction() >= next_eval / cfg.n_evals:
                while fraction() >= next_eval / cfg.n_evals:
                    next_eval += 1
                tr, te = do_eval()
                if budgets.diverged(tr, initial, trivial, best, step / steps_per_epoch):
                    cap = budgets.ceiling(initial, trivial, best, step / steps_per_epoch)
                    rec.update(status="diverged", message=f"train loss {tr:.4g} above the "
                               f"ceiling {cap:.4g} at step {step}")
                    break
                best = min(best, tr)
        if rec["status"] == "ok":
            if not rec["curve"] or rec["curve"][-1]["step"] != step:
                do_eval()
            cap = problem.final_eval_cap
            model.eval()
            with _eval_context(opt):
                rec["final_train_loss"] = evaluate(problem, model, x_tr[:cap], None
                                                   if y_tr is None else y_tr[:cap])
                rec["final_test_loss"] = evaluate(problem, model, x_te[:cap], None
                                                  if y_te is None else y_te[:cap])
            if not math.isfinite(rec["final_train_loss"]):
                rec.update(status="diverged", message="non-finite final train loss")
    except Exception as exc:  # a failing optimizer is recorded; the other runs go on
        rec.update(status="error", message=f"{type(exc).__name__}: {exc}".splitlines()[0],
                   traceback=traceback.format_exc(limit=3))
    finally:
        if bar is not None:
            bar.set_postfix_str(rec["status"] if rec["status"] != "ok" else
                                f"final train {rec.get('final_train_loss', float('nan')):.4g}")
            bar.close()
    rec["steps"] = step
    rec["epochs_done"] = step / steps_per_epoch
    rec["train_time"] = train_time
    timed = step_times[budgets.warmup_steps(len(step_times)):] or step_times
    rec["median_step_time"] = statistics.median(timed) if timed else None
    rec["opt_state_bytes"] = state_bytes(opt) if opt is not None else None
    if device.type == "cuda":
        rec["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    return rec
