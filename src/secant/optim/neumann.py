"""Neumann optimizer (Krishnan, Xiao & Saurous, ICLR 2018, arXiv 1712.03298)."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from secant.distributed import all_reduce_flat, local, shard_group
from secant.linalg.neumann_series import (
    bounded_regulariser_coefficient,
    growth_guard,
    mu_schedule,
    regulariser_coefficient,
)
from secant.optim.contract import OptimizerContract, check_compile, check_lr, scalars
from secant.optim.validation import check, is_int

_STATE = "neumann"
_GLOBAL = "neumann_"  # prefix of the optimizer-wide values in a saved state dict
_REGULARIZERS = ("bounded", "paper")
_FULL = (torch.float32, torch.float64)
_GROWTH_DECAY = 0.9  # running average of gradient norms for the growth guard (~10 steps)


def _state_dtype(p: Tensor) -> torch.dtype:
    """m and v are kept in float32 for bf16/fp16 parameters (a 1 % EMA step of v would round
    away in bf16), in the parameter's dtype otherwise."""
    return p.dtype if p.dtype in _FULL else torch.float32


def _work(params: list[Tensor]) -> list[Tensor]:
    """The parameters themselves where they are float32/64, float32 copies where lower."""
    return [p if p.dtype in _FULL else p.float() for p in params]


def _write_back(params: list[Tensor], ws: list[Tensor]) -> None:
    """Cast updated float32 copies back into low-precision parameters."""
    low = [(p, w) for p, w in zip(params, ws) if w is not p]
    if low:
        torch._foreach_copy_([p for p, _ in low], [w for _, w in low])


def _gradients(maximize: bool, guarded: bool, ws: list[Tensor], grads: list[Tensor],
               ok: Tensor, g_scale: Tensor) -> list[Tensor]:
    """``g`` in the work dtype: 0 where ``ok`` is false (a skipped step), negated to maximise,
    times ``g_scale`` under the growth guard."""
    gs = [torch.where(ok, g.to(w.dtype), 0.0) for g, w in zip(grads, ws)]
    if maximize:
        torch._foreach_neg_(gs)
    if guarded:
        torch._foreach_mul_(gs, g_scale)
    return gs


# One group's update, in place (Algorithm 2), per kind of step; ``η = lr`` is 0 on a skipped
# step. Every per-step number is a tensor and every flag fixed at construction (bound with
# functools.partial), so a compiled step never recompiles across steps, learning rates or
# ``zero_grad`` choices; each kind of step is its own compiled code.


def _burn_in_update(maximize: bool, guarded: bool, keep: float, ws: list[Tensor],
                    grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], rs: list[Tensor],
                    ok: Tensor, lr: Tensor, mu: Tensor, coef: Tensor, g_scale: Tensor) -> None:
    """Burn-in: ``w ← w − η g``."""
    gs = _gradients(maximize, guarded, ws, grads, ok, g_scale)
    torch._foreach_mul_(gs, lr)
    torch._foreach_sub_(ws, gs)


def _reset_update(maximize: bool, guarded: bool, keep: float, ws: list[Tensor],
                  grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], rs: list[Tensor],
                  ok: Tensor, lr: Tensor, mu: Tensor, coef: Tensor, g_scale: Tensor) -> None:
    """A reset (decisions (i), (ii)): only ``m`` changes, ``m ← −η g`` (kept when skipped)."""
    gs = _gradients(maximize, guarded, ws, grads, ok, g_scale)
    torch._foreach_mul_(ms, 1.0 - ok.to(lr.dtype))
    torch._foreach_mul_(gs, lr)
    torch._foreach_sub_(ms, gs)


def _regular_update(maximize: bool, guarded: bool, keep: float, ws: list[Tensor],
                    grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], rs: list[Tensor],
                    ok: Tensor, lr: Tensor, mu: Tensor, coef: Tensor, g_scale: Tensor) -> None:
    """``d = g + c r`` (``rs`` holds ``r = w − v``, overwritten), ``m ← μ m − η d``,
    ``w ← w + μ m − η d``, ``v ← keep·v + (1 − keep)·w`` (``keep = γ``)."""
    okf = ok.to(lr.dtype)
    gs = _gradients(maximize, guarded, ws, grads, ok, g_scale)
    torch._foreach_mul_(rs, coef)
    torch._foreach_add_(rs, gs)  # d = g + c r
    torch._foreach_mul_(rs, lr)  # η d
    torch._foreach_mul_(ms, torch.where(ok, mu, 1.0))
    torch._foreach_sub_(ms, rs)  # m ← μ m − η d
    torch._foreach_add_(ws, torch._foreach_mul(ms, okf * mu))
    torch._foreach_sub_(ws, rs)  # w ← w + μ m − η d
    torch._foreach_lerp_(vs, ws, okf * (1.0 - keep))  # v ← γ v + (1 − γ) w


_UPDATES = {"burn_in": _burn_in_update, "reset": _reset_update, "regular": _regular_update}


def _coefficient(paper: bool, alpha: float, eps: float, ratio: float, beta: Tensor | float,
                 r_norm: Tensor, g_norm: Tensor) -> Tensor:
    """The regulariser coefficient ``c``: the paper's form, or (default) bounded by ``ratio``."""
    if paper:
        return regulariser_coefficient(r_norm, alpha, beta, eps)
    return bounded_regulariser_coefficient(r_norm, g_norm, alpha, beta, eps, ratio)


def _sum_squares(dtype: torch.dtype, sharded: tuple[bool, ...], ts: list[Tensor]) -> Tensor:
    """``[Σ‖t‖² over the FSDP2-sharded tensors of ts, Σ‖t‖² over the others]`` in ``dtype``
    (under FSDP2 the first is summed over the shard group, the second counted once)."""
    def total(kind: bool) -> Tensor:
        kept = [t for t, s in zip(ts, sharded) if s == kind]
        if not kept:
            return torch.zeros((), dtype=dtype, device=ts[0].device)
        if torch.compiler.is_compiling():  # inductor fuses these, not _foreach_norm(dtype=)
            return sum(t.to(dtype).square().sum() for t in kept)
        return torch.stack(torch._foreach_norm(kept, 2, dtype=dtype)).square().sum()
    return torch.stack([total(True), total(False)])


def _local_squares(regular: bool, dtype: torch.dtype, sharded: tuple[bool, ...],
                   ps: list[Tensor], vs: list[Tensor],
                   grads: list[Tensor | None]) -> tuple[Tensor, list[Tensor]]:
    """A step's first half, on this rank's tensors: the sums of squares (:func:`_sum_squares`,
    one row per part) of ``g`` (the parameters with a gradient) and, in a regular step, of
    ``r = w − v`` (every parameter); and ``r``."""
    active = [i for i, g in enumerate(grads) if g is not None]
    squares = [_sum_squares(dtype, tuple(sharded[i] for i in active), [grads[i] for i in active])]
    rs: list[Tensor] = []
    if regular:
        rs = torch._foreach_sub(_work(ps), vs)
        squares.append(_sum_squares(dtype, sharded, rs))
    return torch.stack(squares), rs


def _apply(mode: str, maximize: bool, growth: float | None, keep: float,
           coefficient: Callable[..., Tensor], sizes: tuple[int, ...], ps: list[Tensor],
           grads: list[Tensor | None], ms: list[Tensor], vs: list[Tensor], rs: list[Tensor],
           values: Tensor, skipped: Tensor, avg: Tensor, squares: Tensor) -> None:
    """A step's second half, from the global sums of squares: ``‖g‖`` (non-finite: the step is
    skipped and counted in ``skipped``), the growth guard (``avg`` updated), ``c``, then each
    group's update (``sizes``: its number of parameters; ``values = [μ, lr of each group,
    β_eff]``). In place; no host sync."""
    norms = squares.sum(-1).sqrt()
    g_norm = norms[0]
    ok = torch.isfinite(g_norm)  # no branch on it: a skipped step multiplies by 0 / 1
    skipped.add_(~ok)
    okf = ok.to(norms.dtype)
    g_scale = coef = okf  # placeholders where unused (a tensor keeps one signature)
    if growth is not None:
        g_scale, new_avg = growth_guard(g_norm, avg, growth, _GROWTH_DECAY)
        avg.copy_(new_avg)
        g_norm = g_norm * g_scale
    if mode == "regular":
        coef = torch.where(ok, coefficient(values[-1], norms[1], g_norm), 0.0)
    start = 0
    for k, size in enumerate(sizes):
        idx = [i for i in range(start, start + size) if grads[i] is not None]
        start += size
        if not idx:
            continue
        lps = [ps[i] for i in idx]
        ws = _work(lps)
        _UPDATES[mode](maximize, growth is not None, keep, ws, [grads[i] for i in idx],
                       [ms[i] for i in idx], [vs[i] for i in idx],
                       [rs[i] for i in idx] if rs else [], ok, okf * values[k + 1],
                       values[0], coef, g_scale)
        if mode != "reset":
            _write_back(lps, ws)


def _whole_step(mode: str, maximize: bool, growth: float | None, keep: float,
                coefficient: Callable[..., Tensor], dtype: torch.dtype,
                sharded: tuple[bool, ...], sizes: tuple[int, ...], ps: list[Tensor],
                grads: list[Tensor | None], ms: list[Tensor], vs: list[Tensor],
                values: Tensor, skipped: Tensor, avg: Tensor) -> None:
    """Both halves, on one process (no reduction between them): one compiled graph."""
    squares, rs = _local_squares(mode == "regular", dtype, sharded, ps, vs, grads)
    _apply(mode, maximize, growth, keep, coefficient, sizes, ps, grads, ms, vs, rs, values,
           skipped, avg, squares)


class Neumann(OptimizerContract):
    r"""Neumann optimizer: an implicit inverse Hessian from a Neumann series, without
    Hessian-vector products (paper Algorithm 2; notes and evidence in docs/neumann.md).

    Use / Not supported::

        opt = Neumann(model.parameters(), lr=0.01)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        with opt.undisplaced():                     # evaluate / export these weights
            evaluate(model)

    * works with LR schedulers (warm-up included), ``clip_grad_norm_``, ``torch.amp.GradScaler``
      (a skipped step never reaches ``step()``), ``add_param_group`` (new parameters start
      fresh), float32/float64 and bf16/fp16 parameters (state and arithmetic in float32, the
      update cast back), closures; no host synchronisation in ``step()``.
    * not supported: sparse or complex parameters/gradients (``ValueError``/``RuntimeError``),
      per-group values of anything but ``lr`` (``ValueError``), ``step()`` inside
      :meth:`undisplaced` (``RuntimeError``).
    * learning rate: start at 0.01 (trains on every problem of the safety grid, with or
      without warm-up and clipping); 0.1–0.3 was best for small classifiers. In that grid
      (lr 1e-4…1, benchmarks/neumann_safety.md) the default ends above its start where
      SGD-Nesterov 0.9 trains in none of 324 runs, the paper's algorithm in 177. Only
      ``lr`` is tuned.

    The parameters hold the *displaced* iterate ``w`` (the point where gradients are taken).
    With Neumann iterate ``m`` and moving average ``v`` of the weights, a step with gradient
    ``g = ∇f̂(w)`` on a fresh mini-batch is::

        r = w − v
        d = g + ρ                                  # ρ = regulariser gradient, below
        m ← μ(t) m − η d
        w ← w + μ(t) m − η d
        v ← γ v + (1 − γ) w

    The paper (§3.2) uses ``ρ = c r`` with ``c = α‖r‖ − β_eff/‖r‖³``, the gradient of the
    cubic + repulsive term ``(α/3)‖r‖³ + β_eff/‖r‖`` (global norm over all parameters,
    ``β_eff = beta × n``, ``n`` = number of scalar parameters; Table 1: β = 1e-5 × n).

    **Default: bounded regulariser** (``regularizer="bounded"``). The same direction, but
    shortened where longer than ``reg_ratio`` times the gradient::

        ρ = c r · min(1, reg_ratio ‖g‖ / (|c| ‖r‖))        (reg_ratio = 0.1)

    so the regulariser moves ``w`` by at most 10 % of the gradient step ``η‖g‖``. Reason: the
    repulsive length ``β_eff/‖r‖²`` does not shrink with ``η`` or ``‖g‖``; while ``w`` is
    near ``v`` (first steps, small η, warm-up, clipped gradients) it dominates the step, and
    ``‖w − v‖`` jumps by about ``β_eff/(η‖g‖)`` at step 2. With the literal form a small CNN
    on digits goes 2.35 → 323 in 8 steps at lr 1e-3. Where the paper's term is shorter than
    the bound (late in training, ‖r‖ large) the two forms are identical.
    ``regularizer="paper"`` keeps the literal term. The measured effect (safety grid over lr ×
    warm-up × clipping × 5 problems; large-batch steps-to-target) is in docs/neumann.md.

    **Default: gradient growth guard** (``grad_growth=2``). With ``ā`` the running average
    (factor 0.9) of the gradient norms the optimizer used before, a gradient is shortened to
    ``min(‖g‖, 2ā)`` before the step. Reason: past the edge of stability (``η λ_max`` too
    large, where the Neumann series itself diverges) ``‖g‖`` grows geometrically from step to
    step and the weights overflow within a few steps; the guard turns that into a bounded
    step. Ordinary mini-batch gradients seldom exceed twice their recent average, so it
    seldom binds elsewhere (no step count changed in benchmarks/neumann_large_batch.md), and
    ``ā`` can follow a real rise by 10 % per step. Evidence: docs/neumann.md, section 3b.
    ``regularizer="paper", grad_growth=None`` is the paper's algorithm.

    The weights to evaluate or checkpoint for use are the *undisplaced* ``w − μ m``: use
    :meth:`undisplaced`. With ``alpha = beta = 0``, constant μ, no burn-in and no resets the
    trajectory of the parameters is exactly ``torch.optim.SGD(lr, momentum=μ, nesterov=True)``
    (then ``m = −η·buffer``).

    Schedule (steps, not epochs; :meth:`paper_periods` converts the paper's epochs):

    * steps ``1..burn_in_steps``: vanilla SGD ``w ← w − η g`` (Table 1: 5 epochs);
    * Neumann step ``s = t − burn_in_steps`` (1-based) uses
      ``μ(s) = clip(s / (s + mu_period), mu_min, mu_max)``, the paper's ``1 − 1/(1 + epoch)``
      with a continuous epoch ``s / mu_period`` (0.5 after one period, 0.9 after nine);
    * with ``reset_period = K`` the Neumann steps ``1, 1+K, 1+3K, 1+7K, …`` are resets (gap
      doubling after each reset); ``None`` disables resets entirely, so the first Neumann step
      is an ordinary step from ``m = 0`` (it moves ``w`` by ``−η(1 + μ) g``, as Nesterov SGD).

    Decisions on the ambiguities of Algorithm 2 (docs/neumann.md):

    (i)   A reset step only sets ``m ← −η g``: it moves neither ``w`` nor ``v``. The
          undisplaced point ``w − μ m`` therefore jumps at a reset, as in the paper.
    (ii)  ``v`` is *not* updated on reset steps.
    (iii) ``v`` is a separate buffer, ``v ← copy(w₀)`` at construction, *not* re-set at the
          end of the burn-in (re-setting makes ``‖r‖`` one step long at the first regularised
          step). Where ``‖r‖ ≤ reg_eps`` the regulariser is dropped, so ``w = v`` gives no NaN.
    (iv)  ``t`` of the μ schedule counts epochs in the paper; here ``s / mu_period``,
          continuous.
    (v)   "K starts at 10 epochs and doubles after every reset": resets ``K, 3K, 7K, …`` steps
          after the first Neumann step (plus the trivial reset at that first step).

    Args:
        params: parameters, named parameters or parameter groups (only ``lr`` may differ per
            group; the other hyperparameters couple all parameters through global norms).
        lr: learning rate η (the only tuned hyperparameter in the paper; schedulers work; a
            number or a one-element tensor). The default 0.01 is the largest that trained all
            five problems of the safety grid in every setting (``benchmarks/neumann_safety.md``);
            the best of that grid was 0.1–0.3 on the digits classifiers: tune it.
        alpha: cubic regulariser weight α (Table 1: 1e-7).
        beta: repulsive regulariser weight *per parameter* (Table 1: 1e-5); the weight used is
            ``beta × n``.
        gamma: EMA factor γ of ``v`` (Table 1: 0.99).
        mu_min, mu_max: bounds of the μ schedule (Table 1: 0.5, 0.9); equal gives constant μ.
        burn_in_steps: SGD steps before the Neumann steps (Table 1: 5 epochs).
        reset_period: first gap K between resets of ``m`` in steps, doubling after each reset
            (Table 1: 10 epochs); ``None`` disables resets.
        mu_period: steps per unit ``t`` of the μ schedule (the paper: one epoch). The default
            1000 is a placeholder; pass ``**Neumann.paper_periods(steps_per_epoch)``.
        regularizer: ``"bounded"`` (default, above) or ``"paper"`` (the literal term).
        reg_ratio: bound of the bounded form: ``‖ρ‖ ≤ reg_ratio · ‖g‖``.
        reg_eps: the regulariser is dropped while ``‖w − v‖ ≤ reg_eps``.
        grad_growth: the gradient growth guard (default 2): a gradient whose global norm
            exceeds ``grad_growth`` times the running average (factor 0.9) of the norms before
            it is scaled down to that length; ``None`` turns the guard off (the paper's
            literal algorithm is ``regularizer="paper", grad_growth=None``).
        maximize: ascend the objective (the gradient is negated), as in :mod:`torch.optim`.
        compile: ``True`` (inductor) or a ``torch.compile`` backend name: each kind of step
            (burn-in, reset, regular) runs its math — the norms, the finiteness flag, the
            growth guard, the coefficient and every group's update — as one compiled graph
            (under FSDP2 two, around the reduction of the norms), built at its first use
            (seconds on a CPU) and never rebuilt across steps, learning rates or
            ``zero_grad`` choices; equal to eager up to rounding (``False``, the default).
            Only the host-side schedule (step count, μ, resets) stays eager.

    Parameters whose ``.grad`` is ``None`` are left unchanged in a step (their ``m`` and ``v``
    too), as :class:`torch.optim.SGD` does; they still count in ``n`` and in ``‖w − v‖``.
    A step whose gradients are not all finite (global norm not finite) changes no weight,
    ``m`` or ``v`` (the update is multiplied by 0 on the device, no host sync); it still
    advances the step count, so the μ / reset schedule moves on by one, and it is counted in
    :meth:`diagnostics`. Norms are accumulated in float32 (float64 with float64 parameters).
    Memory: two buffers (``m``, ``v``) per parameter, as Adam (float32 for bf16/fp16).

    Checkpoints: for exact resume save the model *outside* :meth:`undisplaced` (displaced
    weights) together with :meth:`state_dict`; for evaluation or export use the weights inside
    it.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 0.01,
        alpha: float = 1e-7,
        beta: float = 1e-5,
        gamma: float = 0.99,
        mu_min: float = 0.5,
        mu_max: float = 0.9,
        burn_in_steps: int = 0,
        reset_period: int | None = None,
        mu_period: int = 1000,
        *,
        regularizer: str = "bounded",
        reg_ratio: float = 0.1,
        reg_eps: float = 1e-12,
        grad_growth: float | None = 2.0,
        maximize: bool = False,
        compile: bool | str = False,  # noqa: A002 (torch.optim's flag style)
    ) -> None:
        check(math.isfinite(alpha) and alpha >= 0.0, "alpha", alpha, "a finite value >= 0")
        check(math.isfinite(beta) and beta >= 0.0, "beta", beta, "a finite value >= 0")
        check(0.0 <= gamma < 1.0, "gamma", gamma, "a value in [0, 1)")
        check(0.0 <= mu_min < 1.0, "mu_min", mu_min, "a value in [0, 1)")
        check(mu_min <= mu_max < 1.0, "mu_max", mu_max, f"a value in [mu_min={mu_min}, 1)")
        check(is_int(burn_in_steps) and burn_in_steps >= 0, "burn_in_steps", burn_in_steps,
               "an integer >= 0")
        check(reset_period is None or (is_int(reset_period) and reset_period >= 1),
               "reset_period", reset_period, "None or an integer >= 1")
        check(is_int(mu_period) and mu_period >= 1, "mu_period", mu_period,
               "an integer >= 1")
        check(regularizer in _REGULARIZERS, "regularizer", regularizer,
               f"one of {', '.join(_REGULARIZERS)}")
        check(isinstance(reg_ratio, (int, float)) and math.isfinite(reg_ratio) and reg_ratio >= 0,
               "reg_ratio", reg_ratio, "a finite value >= 0")
        check(math.isfinite(reg_eps) and reg_eps >= 0.0, "reg_eps", reg_eps,
               "a finite value >= 0")
        check(grad_growth is None or (isinstance(grad_growth, (int, float))
                                      and math.isfinite(grad_growth) and grad_growth >= 1.0),
               "grad_growth", grad_growth, "None or a finite value >= 1")
        check_lr(lr)
        check(isinstance(maximize, bool), "maximize", maximize, "True or False")
        check_compile(compile)
        self.maximize = maximize
        self.compile = compile
        self.grad_growth = None if grad_growth is None else float(grad_growth)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.mu_min = float(mu_min)
        self.mu_max = float(mu_max)
        self.burn_in_steps = burn_in_steps
        self.reset_period = reset_period
        self.mu_period = mu_period
        self.regularizer = regularizer
        self.reg_ratio = float(reg_ratio)
        self.reg_eps = float(reg_eps)
        self._params: list[Tensor] = []
        self._shard_group: Any = None  # FSDP2: the ranks the DTensor parameters are split over
        self.num_params = 0
        self._inside_undisplaced = False
        super().__init__(params, dict(lr=lr))  # calls add_param_group for every group
        self.state[_STATE] = self._fresh_global()

    @property
    def beta_effective(self) -> float:
        """The repulsive weight used: ``beta × n`` with ``n`` the scalar parameters held."""
        return self.beta * self.num_params

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (only ``lr`` may be set in it). Its parameters start fresh: ``m = 0``,
        ``v = copy(w)``; they join the global norms and ``n`` (so ``beta_effective`` grows)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_lr(group["lr"])
            extra = set(group) - {"params", "lr", "param_names"}
            check(not extra, "param_group keys", sorted(extra),
                  "only 'params' and 'lr' ('param_names' from named_parameters())")
            for p in group["params"]:
                if p.is_sparse or p.is_complex() or not p.is_floating_point():
                    raise ValueError("Neumann supports dense real floating-point parameters only")
            self._shard_group = shard_group([*self._params, *group["params"]], "Neumann")
        except ValueError:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            sdt = _state_dtype(p)
            self.state[p]["m"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
            self.state[p]["v"] = p.detach().to(sdt, copy=True, memory_format=torch.preserve_format)
            self._params.append(p)
            self.num_params += p.numel()  # a DTensor's numel is the global one
        self._sharded = tuple(isinstance(p, DTensor) for p in self._params)
        self.__dict__.pop("_compiled_fns", None)  # compiled for the groups before
        self._norm_dtype = (torch.float64 if any(p.dtype == torch.float64 for p in self._params)
                            else torch.float32)

    @staticmethod
    def paper_periods(steps_per_epoch: int) -> dict[str, int]:
        """Table 1's schedule in steps: 5 epochs burn-in, first reset gap 10 epochs, μ unit
        1 epoch. Use as ``Neumann(params, lr, **Neumann.paper_periods(len(loader)))``."""
        check(is_int(steps_per_epoch) and steps_per_epoch >= 1, "steps_per_epoch",
               steps_per_epoch, "an integer >= 1")
        return {"burn_in_steps": 5 * steps_per_epoch, "reset_period": 10 * steps_per_epoch,
                "mu_period": steps_per_epoch}

    def _fresh_global(self) -> dict[str, Any]:
        # next_reset = 0 never matches a Neumann step (1-based): resets disabled
        return {"step": 0, "resets": 0, "next_reset": 0 if self.reset_period is None else 1,
                "reset_gap": self.reset_period or 0, "mu": 0.0,
                "skipped_steps": torch.zeros((), dtype=torch.int64,
                                             device=self._params[0].device),
                "grad_norm_avg": torch.zeros((), dtype=self._norm_dtype,
                                             device=self._params[0].device)}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` format, every entry keyed by a parameter (so that
        ``torch.distributed.checkpoint`` can map it to a parameter name): the optimizer-wide
        values (step count, μ, reset schedule, counters) sit in the first parameter's entry
        under ``neumann_*`` keys."""
        sd = super().state_dict()
        glob = copy.deepcopy(sd["state"].pop(_STATE))
        first = sd["param_groups"][0]["params"][0]
        sd["state"][first] = {**sd["state"][first],
                              **{_GLOBAL + k: v for k, v in glob.items()}}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys = {_GLOBAL + k for k in self._fresh_global()}

        def check_saved(sd: dict[str, Any]) -> None:
            entries = list(sd["state"].values())
            if not entries or not keys <= set(entries[0]) or "m" not in entries[0]:
                raise ValueError("state_dict was not saved by a Neumann optimizer")

        state_dict = self._load_hooked(state_dict, check_saved)
        first = self.state[self._params[0]]
        glob = {k[len(_GLOBAL):]: copy.deepcopy(state_dict["state"][
            state_dict["param_groups"][0]["params"][0]][k]) for k in keys}
        for k in keys:
            first.pop(k)
        for key in ("skipped_steps", "grad_norm_avg"):
            glob[key] = glob[key].to(self._params[0].device)
        glob["grad_norm_avg"] = glob["grad_norm_avg"].to(self._norm_dtype)
        self.state[_STATE] = glob
        # the base class casts state to the parameter's dtype: take m, v from the saved dict
        # instead (float32 for bf16/fp16 parameters), into own storage shaped as p
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(ids, self._params):
            for key in ("m", "v"):
                buf = torch.empty_like(p, dtype=_state_dtype(p))
                self.state[p][key] = buf.copy_(state_dict["state"][i][key])

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step. ``closure`` (optional) re-evaluates the loss."""
        if self._inside_undisplaced:
            raise RuntimeError("Neumann.step() called inside undisplaced(); leave the context "
                               "first (the parameters hold the undisplaced weights there)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gst = self.state[_STATE]
        active = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        with_grad = [p for ps in active for p in ps]
        if not with_grad:
            return loss
        if any(p.grad.is_sparse for p in with_grad):
            raise RuntimeError("Neumann does not support sparse gradients")
        t = gst["step"] = gst["step"] + 1  # host-side count of steps with gradients
        s = t - self.burn_in_steps
        mu = gst["mu"] = mu_schedule(s, self.mu_period, self.mu_min, self.mu_max) if s > 0 else 0.0
        is_reset = s > 0 and s == gst["next_reset"]
        if is_reset:
            gst["next_reset"] = s + gst["reset_gap"]
            gst["reset_gap"] *= 2
            gst["resets"] += 1
        regular = s > 0 and not is_reset
        mode = "regular" if regular else "reset" if is_reset else "burn_in"
        ps, vs, ms = self._local_params(), self._local_state("v"), self._local_state("m")
        grads = [None if p.grad is None else local(p.grad) for p in self._params]
        sizes = tuple(len(g["params"]) for g in self.param_groups)
        values = scalars([mu, *(g["lr"] for g in self.param_groups), self.beta_effective],
                         self._norm_dtype, self._params[0].device)
        bound = (mode, self.maximize, self.grad_growth, self.gamma, functools.partial(
            _coefficient, self.regularizer == "paper", self.alpha, self.reg_eps, self.reg_ratio))
        counters = (gst["skipped_steps"], gst["grad_norm_avg"])
        if self._shard_group is None:  # one graph with compile
            self._compiled(mode, functools.partial(_whole_step, *bound, self._norm_dtype))(
                self._sharded, sizes, ps, grads, ms, vs, values, *counters)
            return loss
        squares, rs = self._compiled(("squares", regular), functools.partial(
            _local_squares, regular, self._norm_dtype))(self._sharded, ps, vs, grads)
        squares = self._reduce_sharded(squares)
        self._compiled(("apply", mode), functools.partial(_apply, *bound))(
            sizes, ps, grads, ms, vs, rs, values, *counters, squares)
        return loss

    def _reduce_sharded(self, squares: Tensor) -> Tensor:
        """Rows of :func:`_sum_squares` with their sharded column summed over the shard group."""
        return torch.stack([all_reduce_flat([squares[:, 0]], self._shard_group)[0],
                            squares[:, 1]], dim=1)

    def _local_params(self) -> list[Tensor]:
        return [local(p) for p in self._params]

    def _local_state(self, key: str) -> list[Tensor]:
        return [local(self.state[p][key]) for p in self._params]

    def _norms(self, *parts: list[Tensor]) -> list[float]:
        """The global ``‖·‖`` of each part (this rank's tensors, one per parameter)."""
        squares = torch.stack([_sum_squares(self._norm_dtype, self._sharded, ts) for ts in parts])
        if self._shard_group is not None:
            squares = self._reduce_sharded(squares)
        return squares.sum(-1).sqrt().tolist()

    # ------------------------------------------------------------------ evaluation
    @contextmanager
    def undisplaced(self) -> Iterator[None]:
        """Context manager: inside it the parameters hold the undisplaced weights ``w − μ m``
        (Algorithm 2's return value), the ones to evaluate or export; on exit the displaced
        weights are restored bit for bit (from a copy, so it costs one extra copy of the
        parameters while open). ``step()`` inside raises ``RuntimeError``.

        Example::

            with opt.undisplaced():
                val_loss = evaluate(model)
        """
        if self._inside_undisplaced:
            raise RuntimeError("undisplaced() is not re-entrant")
        mu = self.state[_STATE]["mu"]
        params = self._local_params()
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            if mu != 0.0:
                ws = _work(params)
                torch._foreach_add_(ws, self._local_state("m"), alpha=-mu)
                _write_back(params, ws)
        self._inside_undisplaced = True
        try:
            yield
        finally:
            self._inside_undisplaced = False
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    # ------------------------------------------------------------------ reporting
    @torch.no_grad()
    def diagnostics(self) -> dict[str, Any]:
        """Counters for logging (this call synchronises with the device).

        ``step`` counts accepted steps (burn-in included), ``neumann_step`` those after the
        burn-in, ``skipped_steps`` steps skipped for non-finite gradients, ``resets`` resets
        of ``m`` (the one at the first Neumann step included), ``next_reset`` the Neumann step
        of the next reset (``None`` without resets), ``mu`` the μ of the last step,
        ``displacement_norm`` ``‖μ m‖`` and ``distance_to_average`` ``‖w − v‖``.
        """
        gst = self.state[_STATE]
        r = torch._foreach_sub(_work(self._local_params()), self._local_state("v"))
        m_norm, r_norm = self._norms(self._local_state("m"), r)
        return {
            "step": gst["step"],
            "neumann_step": max(0, gst["step"] - self.burn_in_steps),
            "in_burn_in": gst["step"] < self.burn_in_steps,
            "skipped_steps": int(gst["skipped_steps"]),
            "resets": gst["resets"],
            "next_reset": gst["next_reset"] or None,
            "mu": gst["mu"],
            "beta_effective": self.beta_effective,
            "displacement_norm": gst["mu"] * m_norm,
            "distance_to_average": r_norm,
        }
