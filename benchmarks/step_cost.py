"""Per-step cost of secant's optimizers against SGD with momentum on the same model and batch:
process CPU time per step and dispatched aten ops per step (eager mode).

Problems (``secant.bench.problems``; models and losses as the harness builds them): ``digits``,
the 64-32-16-8-16-32-64 autoencoder at batch 100; ``mnist1d``, the 40-256-128-10 MLP at batch
100; ``curves``, the K-BFGS paper's 784-400-200-100-50-25-6-25-50-100-200-400-784 autoencoder
(842,340 parameters) at batch 1000. Data: the problem's training set (its first 8 batches,
cycled), or with ``--synthetic`` random data of the same shapes (uniform in [0, 1] for the
autoencoders, standard normal inputs and uniform labels for the classifier): the cost of a
step does not depend on the values.

Contenders (``secant.bench.registry``, with the committed tuned ``lr`` / knob of the problem,
else the registry default): SGD-momentum (``torch.optim.SGD``, momentum 0.9), Adam, K-FAC (the
harness configuration: Cholesky inverses, factors every 10 steps, inverses every 100),
K-BFGS and K-BFGS(L) (``A`` warm-started on the 8 batches, as the harness does; from the label
``dense_hg`` on also K-BFGS(L) with ``dense_hg=True``, which keeps K-BFGS's dense ``H_g`` in every
layer with ``d_out ≤ 2·history_size`` instead of rebuilding the L-BFGS one from its ring each
step), MomentumLBFGS and Neumann. Every contender has its own copy of the model (same seed)
and is driven as ``loss = opt.step(closure)``, the closure being the harness's
(``zero_grad(set_to_none=True)``, loss, ``backward()``).

Timing: one thread (``torch.set_num_threads(1)``); process CPU time (``time.process_time_ns``)
of each ``opt.step(closure)``; after ``warmup`` untimed steps of each contender (MomentumLBFGS:
up to its first curvature step, ``2T + 1``, its steady state; runs before the label
``compiled`` timed it from step ``warmup`` on, half of its steps still SGD's), ``rounds``
rounds in each of which every contender (in an order rotated round by round) runs ``steps``
consecutive timed steps, so machine load drifting during the run hits all alike. Reported: the
median CPU ms per step over all timed steps, its ratio to SGD's median ("ratio"), the median over
rounds of the per-round ratio of medians ("paired"), and the mean ms per step (K-FAC's factor
steps, every 10th, and inverse steps are in the mean, not the median).

Compiled contenders (``… compiled``): K-FAC, K-BFGS, K-BFGS(L), MomentumLBFGS and Neumann with
``compile=True`` (inductor), at their eager version's settings; compiled during the warm-up
steps; their ops are not counted (a dispatch mode does not see inside a compiled graph).

"K-BFGS GEMM floor" (from the label ``floor`` on) is not an optimizer but a yardstick
(:class:`GemmFloor`): only the matrix products a K-BFGS step cannot do without — pass 1, the
input Grams, pass 2 without weight gradients, the direction ``H_g ∇ H_a`` — so that a K-BFGS
ratio splits into what its arithmetic costs on this machine and what the rest costs.

Op counts: a ``TorchDispatchMode`` counts every aten op dispatched during ``--count-steps``
further steps of each contender (ops after composite decomposition: what actually runs,
including views and the ops of forward and backward). "ops/step" is the median over those steps;
"extra ops / layer" is ``(ops/step − SGD's ops/step) / L`` for the layer optimizers (``L``
Kronecker layers): SGD's whole step (one forward and backward, and its update) stands in for
the model's own passes, so this is what a step of the method dispatches per layer beyond one
model pass (K-BFGS's second pass, cheaper than the first, included).

    python benchmarks/step_cost.py --label after      # full run, ≈ 3–4 min on 2 CPU cores
    python benchmarks/step_cost.py --quick            # smoke run, < 1 min, writes nothing
    python benchmarks/step_cost.py --device cuda --label cuda-h100   # on a GPU, ≈ 3 min

``--device cuda``: models and batches on the GPU; each step timed by wall clock between two
``torch.cuda.synchronize()`` calls (the step's whole device work), kernel launches per step
counted with ``torch.profiler`` (median over ``--count-steps`` steps), and
``torch.optim.Adam(fused=True)`` added as a contender. Not yet run on a GPU.

With ``--label NAME`` the run is stored under that name in ``--json`` (default
benchmarks/results/step_cost.json, other labels kept) and ``--md`` (default
benchmarks/step_cost.md) is rewritten from every stored label, with the targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from secant import MomentumLBFGS
from secant.bench import tuned_table
from secant.bench.problems import Problem, get_problem, seeded_model
from secant.bench.registry import get_optimizer, register_variant
from secant.optim.kbfgs import input_statistics

# "kbfgsl-dense": K-BFGS(L) with dense_hg=True (K-BFGS's dense H_g where d_out <= 2m)
EAGER = ("sgd", "adam", "kfac", "kbfgs", "kbfgsl", "kbfgsl-dense", "mlbfgs", "neumann")
# with compile=True (inductor), as "<name>-compiled"
COMPILED = ("kfac", "kbfgs", "kbfgsl", "mlbfgs", "neumann")
CONTENDERS = EAGER + tuple(f"{name}-compiled" for name in COMPILED) + ("kbfgs-floor",)
NAMES = {"sgd": "SGD-momentum", "adam": "Adam", "kfac": "K-FAC", "kbfgs": "K-BFGS",
         "kbfgsl": "K-BFGS(L)", "kbfgsl-dense": "K-BFGS(L) dense_hg",
         "mlbfgs": "MomentumLBFGS", "neumann": "Neumann"}
NAMES.update({f"{name}-compiled": f"{NAMES[name]} compiled" for name in COMPILED})
NAMES["adam-fused"] = "Adam (fused)"  # CUDA runs only
NAMES["kbfgs-floor"] = "K-BFGS GEMM floor"  # a yardstick, not an optimizer (GemmFloor)
LAYER_OPTIMIZERS = ("kfac", "kbfgs", "kbfgsl", "kbfgsl-dense")
# (rounds, steps per round, warm-up steps) of the full and of the quick run
PLANS = {"digits": ((9, 20, 10), (2, 4, 3)), "mnist1d": ((9, 20, 10), (2, 4, 3)),
         "curves": ((7, 8, 4), (1, 2, 1))}
BATCHES = 8  # distinct batches, cycled
# the targets of issue 20 (CPU-time ratio to SGD-momentum, median), and ops per layer
TARGETS = {("digits", "kbfgs"): 5.0, ("digits", "kbfgsl"): 6.0, ("digits", "kfac"): 2.0,
           ("mnist1d", "kbfgs"): 4.0, ("curves", "kbfgs"): 2.5, ("curves", "kbfgsl"): 2.5,
           ("curves", "kfac"): 1.55, ("digits", "neumann-compiled"): 1.3,
           ("digits", "mlbfgs-compiled"): 1.3}
OPS_PER_LAYER_TARGET = 60
ROOT = Path(__file__).resolve().parent


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, in all and by name."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.by_name[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def make_batches(problem: Problem, synthetic: bool, device: str = "cpu"
                 ) -> list[tuple[Tensor, Tensor | None]]:
    return [(x.to(device), None if y is None else y.to(device))
            for x, y in _host_batches(problem, synthetic)]


def _host_batches(problem: Problem, synthetic: bool) -> list[tuple[Tensor, Tensor | None]]:
    n = problem.batch_size
    if synthetic:
        g = torch.Generator().manual_seed(0)
        d_in = next(m for m in problem.build().modules() if isinstance(m, nn.Linear)).in_features
        if problem.criterion == "bce_sum":  # an autoencoder
            return [(torch.rand(n, d_in, generator=g), None) for _ in range(BATCHES)]
        return [(torch.randn(n, d_in, generator=g), torch.randint(0, 10, (n,), generator=g))
                for _ in range(BATCHES)]
    data = problem.load(None, False)
    out = []
    for k in range(BATCHES):
        rows = slice(k * n, (k + 1) * n)
        out.append((data.x_train[rows], None if data.y_train is None else data.y_train[rows]))
    return out


@dataclass
class Contender:
    name: str
    model: nn.Module
    opt: object
    problem: Problem
    batches: list
    k: int = 0
    clock: Callable[[], int] = time.process_time_ns
    times: list[list[int]] = field(default_factory=list)  # ns per step, per round
    last_loss: float = math.nan

    def step(self) -> None:
        xb, yb = self.batches[self.k % len(self.batches)]
        self.k += 1
        model, opt, problem = self.model, self.opt, self.problem

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = problem.loss(model, xb, yb)
            loss.backward()
            return loss

        self.last_loss = opt.step(closure)

    def timed_steps(self, n: int) -> None:
        ts = []
        for _ in range(n):
            t0 = self.clock()
            self.step()
            ts.append(self.clock() - t0)
        self.times.append(ts)


def cuda_clock() -> int:
    """Wall-clock ns after the device finished everything queued (a step's whole cost)."""
    torch.cuda.synchronize()
    return time.perf_counter_ns()


class GemmFloor:
    """Not an optimizer: the matrix products of one K-BFGS step and nothing else, a yardstick
    for what the step must cost on this machine. Pass 1 (forward and backward); every layer's
    input Gram ``mean ā āᵀ`` (:func:`secant.optim.kbfgs.input_statistics`, K-BFGS's own); pass 2
    with the weights frozen (only the first layer's bias trainable, so backward reaches every
    pre-activation and computes no weight gradient); the direction ``H_g [∇W, ∇b] H_a`` (two
    GEMMs per layer, identity ``H_g``, ``H_a``) added to the parameters. No capture hooks,
    statistics, curvature updates, averages or finiteness tests. ``nn.Linear`` layers with a
    bias only (the problems' models)."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not self.layers or any(m.bias is None for m in self.layers):
            raise ValueError("GemmFloor: a model of biased nn.Linear layers")
        self.params = list(model.parameters())
        self.lr = lr
        self.inputs: dict[nn.Module, Tensor] = {}
        for m in self.layers:
            m.register_forward_hook(self._keep)
        kw = dict(dtype=self.params[0].dtype, device=self.params[0].device)
        self.h_g = [torch.eye(m.out_features, **kw) for m in self.layers]
        self.h_a = [torch.eye(m.in_features + 1, **kw) for m in self.layers]

    def _keep(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        self.inputs[module] = args[0]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        for m in self.layers:
            input_statistics(m, self.inputs[m].detach())
        grads = [p.grad for p in self.params]
        first_bias = self.layers[0].bias
        for p in self.params:
            p.requires_grad_(p is first_bias)
        closure()
        for p, g in zip(self.params, grads):
            p.requires_grad_(True)
            p.grad = g
        with torch.no_grad():
            for m, h_g, h_a in zip(self.layers, self.h_g, self.h_a):
                grad = torch.cat((m.weight.grad, m.bias.grad.unsqueeze(1)), 1)
                d = h_g @ grad @ h_a
                m.weight.add_(d[:, :-1], alpha=-self.lr)
                m.bias.add_(d[:, -1], alpha=-self.lr)
        return loss.detach()


def build(problem: Problem, name: str, batches: list, device: str = "cpu") -> Contender:
    clock = cuda_clock if device.startswith("cuda") else time.process_time_ns
    model = seeded_model(problem, 0).to(device)
    if name == "kbfgs-floor":
        return Contender(name, model, GemmFloor(model), problem, batches, clock=clock)
    entry = get_optimizer(name)
    lr, knob, _ = tuned_table.package().settings(entry, problem.name)
    opt = entry.make(model, lr, knob)
    if entry.warm_start:
        opt.warm_start([(x,) for x, _ in batches])
    return Contender(name, model, opt, problem, batches, clock=clock)


def steady_start(opt: object) -> int:
    """Steps before an optimizer's steady-state step: MomentumLBFGS runs SGD until its first
    pair at step ``2T`` (and compiles one graph per kind of step up to ``2T + 1``)."""
    return 2 * opt.update_period + 1 if isinstance(opt, MomentumLBFGS) else 0


def count_ops(c: Contender, steps: int) -> dict:
    per_step, names = [], Counter()
    for _ in range(steps):
        with OpCounter() as mode:
            c.step()
        per_step.append(sum(mode.by_name.values()))
        names.update(mode.by_name)
    return {"ops_per_step": statistics.median(per_step), "ops_mean": statistics.fmean(per_step),
            "top_ops": {k: round(v / steps, 1) for k, v in names.most_common(14)}}


def count_launches(c: Contender, steps: int) -> float:
    """Median number of CUDA kernels a step launches (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            c.step()
            torch.cuda.synchronize()
        counts.append(sum(e.count for e in prof.key_averages()
                          if e.device_type == torch.autograd.DeviceType.CUDA))
    return statistics.median(counts)


def run_problem(pname: str, quick: bool, synthetic: bool, count_steps: int,
                device: str = "cpu") -> dict:
    problem = get_problem(pname)
    rounds, steps, warmup = PLANS[pname][quick]
    batches = make_batches(problem, synthetic or (quick and pname == "curves"), device)
    for name in COMPILED:
        register_variant(name, f"{name}-compiled", pname, compile=True)
    register_variant("kbfgsl", "kbfgsl-dense", pname, dense_hg=True)
    cuda = device.startswith("cuda")
    if cuda:
        register_variant("adam", "adam-fused", pname, fused=True)
    cs = [build(problem, name, batches, device)
          for name in CONTENDERS + (("adam-fused",) if cuda else ())]
    for _ in range(warmup):
        for c in cs:
            c.step()
    for c in cs:  # then each on to its steady state
        for _ in range(steady_start(c.opt) - warmup):
            c.step()
    for r in range(rounds):
        for c in cs[r % len(cs):] + cs[: r % len(cs)]:
            c.timed_steps(steps)
    sgd = cs[0]
    sgd_med = statistics.median(t for ts in sgd.times for t in ts)
    out = {"batch": problem.batch_size, "rounds": rounds, "steps": steps, "warmup": warmup,
           "contenders": {}}
    for c in cs:
        flat = [t for ts in c.times for t in ts]
        med = statistics.median(flat)
        paired = statistics.median(statistics.median(a) / statistics.median(b)
                                   for a, b in zip(c.times, sgd.times))
        loss = float(c.last_loss.detach()) if isinstance(c.last_loss, Tensor) else c.last_loss
        out["contenders"][c.name] = {"ms": med / 1e6, "mean_ms": statistics.fmean(flat) / 1e6,
                                     "ratio": med / sgd_med, "paired": paired,
                                     "last_loss": loss}
    for c in cs:
        if not c.name.endswith("-compiled"):  # a dispatch mode does not see inside graphs
            out["contenders"][c.name].update(count_ops(c, count_steps))
        if cuda:
            out["contenders"][c.name]["launches"] = count_launches(c, count_steps)
    base = out["contenders"]["sgd"]["ops_per_step"]
    for c in cs:
        if c.name in LAYER_OPTIMIZERS:
            rec = out["contenders"][c.name]
            rec["layers"] = len(c.opt.layers)
            rec["extra_ops_per_layer"] = (rec["ops_per_step"] - base) / rec["layers"]
    return out


def machine(device: str = "cpu") -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "platform": platform.platform()}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


# ------------------------------------------------------------------------------------ report
def table(run: dict) -> list[str]:
    cuda = run.get("device", "cpu").startswith("cuda")
    clock = "synchronised ms/step" if cuda else "CPU ms/step"
    lines = []
    for pname, pr in run["problems"].items():
        lines += [f"**{pname}** (batch {pr['batch']}; {pr['rounds']} rounds × {pr['steps']} "
                  f"steps, warm-up {pr['warmup']})", "",
                  f"| optimizer | {clock} (median) | ratio / paired | mean ms | ops/step "
                  "| extra ops / layer |" + (" kernel launches / step |" if cuda else ""),
                  "|---|---|---|---|---|---|" + ("---|" if cuda else "")]
        for name, c in pr["contenders"].items():
            per_layer = (f"{c['extra_ops_per_layer']:.0f} (L = {c['layers']})"
                         if "extra_ops_per_layer" in c else "")
            ops = f"{c['ops_per_step']:.0f}" if "ops_per_step" in c else "(compiled)"
            launches = f" {c['launches']:.0f} |" if cuda else ""
            lines.append(f"| {NAMES[name]} | {c['ms']:.3g} | {c['ratio']:.2f} / "
                         f"{c['paired']:.2f} | {c['mean_ms']:.3g} | {ops} | {per_layer} |"
                         + launches)
        lines.append("")
    return lines


def render(runs: dict) -> str:
    doc = __doc__.split("\n\n    python")[0]
    lines = ["# Step cost against SGD-momentum (CPU time and dispatched ops)", "",
             "Generated by `benchmarks/step_cost.py` from `benchmarks/results/step_cost.json`.",
             "", doc, ""]
    labels = list(runs)
    lines += ["## Targets (median CPU-time ratio to SGD-momentum; ops per K-BFGS layer)", "",
              "| problem / optimizer | target | " + " | ".join(labels) + " |",
              "|---|---|" + "---|" * len(labels)]
    for (pname, name), target in TARGETS.items():
        cells = []
        for lab in labels:
            c = runs[lab]["problems"].get(pname, {}).get("contenders", {}).get(name)
            cells.append("—" if c is None else
                         f"{c['ratio']:.2f}× {'met' if c['ratio'] <= target else 'not met'}")
        lines.append(f"| {pname} {NAMES[name]} | ≤ {target}× | " + " | ".join(cells) + " |")
    for pname in ("digits", "mnist1d", "curves"):
        for name in ("kbfgs", "kbfgsl"):
            cells = []
            for lab in labels:
                c = runs[lab]["problems"].get(pname, {}).get("contenders", {}).get(name)
                cells.append("—" if c is None else f"{c['extra_ops_per_layer']:.0f} "
                             f"{'met' if c['extra_ops_per_layer'] <= OPS_PER_LAYER_TARGET else 'not met'}")  # noqa: E501
            lines.append(f"| {pname} {NAMES[name]} ops / layer | ≤ {OPS_PER_LAYER_TARGET} | "
                         + " | ".join(cells) + " |")
    lines += ["", "## All contenders: CPU-time ratio to SGD-momentum (extra ops / layer)", "",
              "| problem | optimizer | " + " | ".join(labels) + " |",
              "|---|---|" + "---|" * len(labels)]
    for pname in ("digits", "mnist1d", "curves"):
        for name in CONTENDERS:
            cells = []
            for lab in labels:
                c = runs[lab]["problems"].get(pname, {}).get("contenders", {}).get(name)
                cells.append("—" if c is None else f"{c['ratio']:.2f}×" + (
                    f" ({c['extra_ops_per_layer']:.0f})" if "extra_ops_per_layer" in c else ""))
            lines.append(f"| {pname} | {NAMES[name]} | " + " | ".join(cells) + " |")
    lines.append("")
    for lab in labels:
        run = runs[lab]
        m = run["machine"]
        gpu = f"{m['gpu']} (synchronised wall-clock per step); " if "gpu" in m else ""
        lines += [f"## {lab}", "", f"`{run['command']}` — {run['date']}; {gpu}{m['cpu']}, "
                  f"{m['cores']} cores (shared; load average {run['load'][0]:.1f} at the start, "
                  f"{run['load'][1]:.1f} at the end), torch {m['torch']}, Python {m['python']}, "
                  f"one thread; data: {run['data']}.", ""]
        if run.get("note"):
            lines += [run["note"], ""]
        lines += table(run)
        for pname, pr in run["problems"].items():
            for name in ("kbfgs", "kbfgsl"):
                top = ", ".join(f"{k} {v:g}" for k, v in pr["contenders"][name]["top_ops"].items())
                lines.append(f"* {pname} {NAMES[name]}, most dispatched ops per step: {top}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", default="digits,mnist1d,curves")
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, synthetic "
                    "CURVES data, nothing written")
    ap.add_argument("--synthetic", action="store_true", help="random data of the problems' "
                    "shapes instead of their datasets")
    ap.add_argument("--count-steps", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (process CPU time) or cuda "
                    "(synchronised wall-clock, kernel launches per step, fused Adam added)")
    ap.add_argument("--label", default=None, help="store the run under this name and rewrite "
                    "the markdown report")
    ap.add_argument("--note", default="", help="a sentence stored with the run")
    ap.add_argument("--json", default=str(ROOT / "results" / "step_cost.json"))
    ap.add_argument("--md", default=str(ROOT / "step_cost.md"))
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here")
    torch.set_num_threads(1)
    count_steps = args.count_steps or (2 if args.quick else 10)
    load0 = os.getloadavg()[0]
    problems = {}
    for pname in args.problems.split(","):
        t0 = time.perf_counter()
        problems[pname] = run_problem(pname, args.quick, args.synthetic, count_steps,
                                      args.device)
        print(f"{pname}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    run = {"command": "python benchmarks/step_cost.py " + shlex.join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(args.device),
           "device": args.device,
           "load": [load0, os.getloadavg()[0]], "note": args.note,
           "data": "random data of the problems' shapes" if args.synthetic else
           ("the problems' datasets (CURVES: random)" if args.quick else
            "the problems' datasets, first 8 batches cycled"),
           "problems": problems}
    print("\n".join(table(run)))
    if args.label:
        path = Path(args.json)
        runs = json.loads(path.read_text()) if path.exists() else {}
        runs[args.label] = run
        path.write_text(json.dumps(runs, indent=1) + "\n")
        Path(args.md).write_text(render(runs) + "\n")


if __name__ == "__main__":
    main()
