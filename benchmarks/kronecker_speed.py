"""CPU iteration time of the Kronecker-factored optimizers relative to SGD with momentum, and
their optimizer-state memory, on the MNIST autoencoder of the K-BFGS paper at batch 1000.

Model: 784-1000-500-250-30-250-500-1000-784 (ReLU, linear code layer; 2,837,314 parameters),
sigmoid-BCE summed over pixels. Data: random MNIST-shaped batches in [0, 1] (timing does not
depend on the values; no download). Every method is driven as ``loss = opt.step(closure)``.

Methods: SGD-momentum; secant's K-FAC in the harness configuration (``secant bench``: Cholesky,
factored damping) and in the standard-reference configuration (eigendecompositions, exact
damping); :class:`ReferenceKFAC`, a minimal standard eigen K-FAC preconditioner written here
for the comparison; K-BFGS; K-BFGS(L). All K-FAC variants update factors every 10 steps and
inverses every 100.

Timing: methods are interleaved round by round (machine noise hits all of them alike). A round
runs ``--steps`` consecutive steps of each method (default 10 = one factor-update period, so
each K-FAC round holds exactly one factor update) and, for the K-FAC variants, times one
inverse update on its own. The time per iteration is the median over rounds of
``round time / steps``, plus ``median inverse-update time / 100`` for K-FAC (amortised over
the inverse period); "ratio" divides it by the SGD median of the same run, "paired ratio" is
the median over rounds of (round time + inverse update / 100) / SGD's time in the same round,
which is less sensitive to load that drifts during the run.

    python benchmarks/kronecker_speed.py --rounds 7 --steps 10 --threads 1 --out results.md
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from report_out import emit
from torch import Tensor, nn

from secant import KBFGS, KBFGSL, KFAC
from secant.bench.models import MNIST_WIDTHS, autoencoder
from secant.bench.runner import state_bytes

T_COV, T_INV = 10, 100
STD = dict(lr=1e-3, damping=1e-3, kl_clip=1e-3)  # the standard eigen K-FAC defaults


class ReferenceKFAC:
    """The standard eigen K-FAC preconditioner followed by heavy-ball SGD, for ``nn.Linear``.

    Every ``t_cov`` steps the factors ``A = E[ā āᵀ]`` (input with a 1 appended) and
    ``G = E[(N g)(N g)ᵀ]`` (``g`` the gradient of the batch-mean loss w.r.t. the layer output)
    are folded into running averages started at the identity with weight ``stat_decay``.
    Every ``t_inv`` steps both are eigendecomposed in their dtype (eigenvalues below 1e-10 set
    to 0). Each step the gradient ``X = [∇W, ∇b]`` becomes
    ``V = Q_G[(Q_Gᵀ X Q_A) / (d_G d_Aᵀ + λ)]Q_Aᵀ``, scaled by the KL-clip factor
    ``ν = min(1, sqrt(κ / (η² Σ⟨V, X⟩)))``, and handed to :class:`torch.optim.SGD`.
    """

    def __init__(self, model: nn.Module, lr: float, damping: float, kl_clip: float,
                 momentum: float = 0.9, stat_decay: float = 0.95, t_cov: int = T_COV,
                 t_inv: int = T_INV) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        self.lr, self.damping, self.kl_clip = lr, damping, kl_clip
        self.stat_decay, self.t_cov, self.t_inv = stat_decay, t_cov, t_inv
        self.k = 0
        self.inputs: dict[nn.Module, Tensor] = {}
        self.grads: dict[nn.Module, Tensor] = {}
        self.state: dict[nn.Module, dict[str, Tensor]] = {}
        for m in self.layers:
            m.register_forward_hook(self._hook)

    def _hook(self, m: nn.Module, inputs: tuple, out: Tensor) -> None:
        if self.k % self.t_cov == 0 and torch.is_grad_enabled():
            self.inputs[m] = inputs[0].detach()
            out.register_hook(lambda g, m=m: self.grads.__setitem__(m, g.detach()))

    def _update_factors(self) -> None:
        for m in self.layers:
            x, g = self.inputs.pop(m), self.grads.pop(m)
            n = x.shape[0]
            a = torch.cat((x, x.new_ones(n, 1)), 1)
            st = self.state.setdefault(m, {})
            new = {"A": a.T @ (a / n), "G": (g * n).T @ g}
            for key, val in new.items():
                if key not in st:
                    st[key] = torch.eye(val.shape[0], dtype=val.dtype)
                st[key].mul_(self.stat_decay).add_(val, alpha=1 - self.stat_decay)

    def update_inverses(self) -> None:
        for m in self.layers:
            st = self.state[m]
            for key in ("A", "G"):
                d, q = torch.linalg.eigh(st[key])
                st["d" + key], st["Q" + key] = d * (d > 1e-10), q

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        self.sgd.zero_grad()
        with torch.enable_grad():
            loss = closure()
        if self.k % self.t_cov == 0:
            self._update_factors()
        if self.k % self.t_inv == 0:
            self.update_inverses()
        vs, quad = [], 0.0
        for m in self.layers:
            st = self.state[m]
            x = torch.cat((m.weight.grad, m.bias.grad[:, None]), 1)
            inner = st["QG"].T @ x @ st["QA"]
            v = st["QG"] @ (inner / (st["dG"][:, None] * st["dA"][None] + self.damping)) \
                @ st["QA"].T
            vs.append(v)
            quad += float((v * x).sum()) * self.lr ** 2
        nu = min(1.0, math.sqrt(self.kl_clip / quad)) if quad > 0 else 1.0
        for m, v in zip(self.layers, vs):
            m.weight.grad.copy_(v[:, :-1]).mul_(nu)
            m.bias.grad.copy_(v[:, -1]).mul_(nu)
        self.sgd.step()
        self.k += 1
        return loss

    def state_bytes(self) -> int:
        tensors = [t for st in self.state.values() for t in st.values()]
        tensors += [s["momentum_buffer"] for s in self.sgd.state.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def make(name: str, model: nn.Module) -> torch.optim.Optimizer | ReferenceKFAC:
    periods = dict(factor_update_period=T_COV, inverse_update_period=T_INV)
    if name == "SGD-momentum":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if name == "K-FAC (bench: cholesky, factored)":
        return KFAC(model, lr=1e-2, damping=0.03, inverse_method="cholesky", **periods)
    if name == "K-FAC (eigen, exact)":
        return KFAC(model, **STD, inverse_method="eigen", damping_mode="exact", **periods)
    if name == "reference eigen K-FAC":
        return ReferenceKFAC(model, **STD)
    if name == "K-BFGS":
        return KBFGS(model, lr=0.05, damping=0.3)
    if name == "K-BFGS(L)":
        return KBFGSL(model, lr=0.05, damping=0.3, history_size=100)
    raise ValueError(name)


METHODS = ["SGD-momentum", "K-FAC (bench: cholesky, factored)", "K-FAC (eigen, exact)",
           "reference eigen K-FAC", "K-BFGS", "K-BFGS(L)"]


def inverse_update(opt: object) -> Callable[[], None] | None:
    """The inverse update of a K-FAC variant as a call (timed on its own), else None."""
    if isinstance(opt, KFAC):
        return opt._update_inverses
    if isinstance(opt, ReferenceKFAC):
        return opt.update_inverses
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=T_COV)
    ap.add_argument("--warmup", type=int, default=T_COV)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                    help="a subset of the methods (by name, e.g. SGD-momentum K-BFGS); "
                         "SGD-momentum, the baseline of the ratios, is always included")
    args = ap.parse_args()
    methods = METHODS if args.methods is None else [
        m for m in METHODS if m == "SGD-momentum" or m in args.methods]
    unknown = set(args.methods or ()) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, MNIST_WIDTHS[0])
    runs: dict[str, tuple[nn.Module, object, Callable]] = {}
    for name in methods:
        torch.manual_seed(0)
        model = autoencoder(MNIST_WIDTHS)
        opt = make(name, model)

        def closure(model=model, opt=opt):
            for p in model.parameters():
                p.grad = None
            loss = F.binary_cross_entropy_with_logits(model(x), x, reduction="sum") / len(x)
            loss.backward()
            return loss

        for _ in range(args.warmup):  # includes the first factor and inverse updates
            opt.step(closure)
        runs[name] = (model, opt, closure)
    t0_all = time.perf_counter()
    times: dict[str, list[float]] = {n: [] for n in methods}
    inv_times: dict[str, list[float]] = {n: [] for n in methods}
    for _ in range(args.rounds):
        for name in methods:
            _, opt, closure = runs[name]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = opt.step(closure)
            float(loss.detach())  # wait for the last step
            times[name].append((time.perf_counter() - t0) / args.steps)
            inv = inverse_update(opt)
            if inv is not None:
                t0 = time.perf_counter()
                inv()
                inv_times[name].append(time.perf_counter() - t0)
    total = time.perf_counter() - t0_all
    per_iter = {n: statistics.median(times[n]) + (statistics.median(inv_times[n]) / T_INV
                                                  if inv_times[n] else 0.0) for n in methods}
    base = per_iter["SGD-momentum"]
    n_params = sum(p.numel() for p in runs["SGD-momentum"][0].parameters())
    lines = [
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}; "
        f"python {platform.python_version()}",
        f"model: MNIST autoencoder {'-'.join(map(str, MNIST_WIDTHS))} ({n_params:,} parameters), "
        f"batch {args.batch}",
        f"rounds {args.rounds} x {args.steps} steps per method (interleaved), warm-up "
        f"{args.warmup} steps; K-FAC factors every {T_COV}, inverses every {T_INV} steps; "
        f"timed part {total:.0f} s",
        "",
        "| method | s/iter (amortised) | steps s/iter, all rounds | inverse update s (median) "
        "| ratio to SGD-momentum | paired ratio | optimizer state MiB | "
        "state / #params (floats) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in methods:
        opt = runs[name][1]
        sb = opt.state_bytes() if isinstance(opt, ReferenceKFAC) else state_bytes(opt)
        rounds = ", ".join(f"{t:.3f}" for t in times[name])
        inv = f"{statistics.median(inv_times[name]):.2f}" if inv_times[name] else "-"
        amortised = [t + (i / T_INV if inv_times[name] else 0.0) for t, i in
                     zip(times[name], inv_times[name] or times[name])]
        paired = statistics.median(t / b for t, b in zip(amortised, times["SGD-momentum"]))
        lines.append(f"| {name} | {per_iter[name]:.3f} | {rounds} | {inv} | "
                     f"{per_iter[name] / base:.2f}x | {paired:.2f}x | {sb / 2**20:.1f} | "
                     f"{sb / 4 / n_params:.2f} |")
    text = "\n".join(lines)
    emit(text, args.out)


if __name__ == "__main__":
    main()
