"""Neumann optimizer (Krishnan, Xiao & Saurous, ICLR 2018, arXiv 1712.03298)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from secant.linalg.neumann_series import mu_schedule, regulariser_coefficient
from secant.optim.validation import check, is_int

_STATE = "neumann"


class Neumann(Optimizer):
    r"""Neumann optimizer: an implicit inverse Hessian from a Neumann series, without
    Hessian-vector products (paper Algorithm 2; ALGORITHMS.md §4.4).

    The parameters hold the *displaced* iterate ``w`` (the point where gradients are taken).
    With Neumann iterate ``m`` and moving average ``v`` of the weights, a step with gradient
    ``g = ∇f̂(w)`` on a fresh mini-batch is::

        r = w − v
        d = g + (α‖r‖² − β_eff/‖r‖²) r/‖r‖        # cubic + repulsive regulariser, paper §3.2
        m ← μ(t) m − η d
        w ← w + μ(t) m − η d
        v ← γ v + (1 − γ) w

    with ``‖·‖`` the global norm over all parameters of the optimizer and
    ``β_eff = beta × n`` (``n`` = number of scalar parameters; Table 1 writes β = 1e-5 × n).
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

    Decisions on the ambiguities of Algorithm 2 (ALGORITHMS.md §4.4):

    (i)   A reset step only sets ``m ← −η g``: it moves neither ``w`` nor ``v`` (``d`` is only
          defined in the non-reset branch). As in the paper, the undisplaced point ``w − μ m``
          therefore jumps at a reset, because ``m`` changes while ``w`` does not.
    (ii)  ``v`` is *not* updated on reset steps (literal reading; ``w`` does not move there).
    (iii) ``v`` is a separate buffer, never a view of the weights: ``v ← copy(w₀)`` at
          construction, as in Algorithm 2, and it is *not* re-set at the end of the burn-in
          (ALGORITHMS.md suggested ``v ← w`` there; measured, that makes ``‖r‖`` one step long
          at the first regularised step, and the repulsive push ``η β n/‖r‖²`` then blew up a
          210k-parameter autoencoder; with ``v = w₀`` the burn-in distance keeps ``‖r‖`` away
          from 0). The regulariser is guarded: where ``‖r‖ ≤ reg_eps`` it is dropped
          (coefficient 0), so ``w = v`` gives no NaN.
    (iv)  ``t`` of the μ schedule counts epochs in the paper; here ``s / mu_period`` with
          ``s`` the Neumann step (burn-in excluded), continuous rather than floored.
    (v)   "K starts at 10 epochs and doubles after every reset": resets ``K, 3K, 7K, 15K, …``
          steps after the first Neumann step (plus the trivial reset at that first step).

    Args:
        params: parameters or parameter groups (only ``lr`` may differ per group; the other
            hyperparameters couple all parameters through global norms).
        lr: learning rate η (the only tuned hyperparameter in the paper; schedulers work).
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
        reg_eps: the regulariser is dropped while ``‖w − v‖ ≤ reg_eps``.

    Parameters whose ``.grad`` is ``None`` are left unchanged in a step (their ``m`` and ``v``
    too), as :class:`torch.optim.SGD` does; they still count in ``n`` and in ``‖w − v‖``.
    A step whose gradients are not all finite is skipped entirely (no state changes) and
    counted in :meth:`diagnostics`. Memory: two buffers (``m``, ``v``) per parameter, as Adam.

    Checkpoints: for exact resume save the model *outside* :meth:`undisplaced` (displaced
    weights) together with :meth:`state_dict`; for evaluation or export use the weights inside
    it.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        alpha: float = 1e-7,
        beta: float = 1e-5,
        gamma: float = 0.99,
        mu_min: float = 0.5,
        mu_max: float = 0.9,
        burn_in_steps: int = 0,
        reset_period: int | None = None,
        mu_period: int = 1000,
        *,
        reg_eps: float = 1e-12,
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
        check(math.isfinite(reg_eps) and reg_eps >= 0.0, "reg_eps", reg_eps,
               "a finite value >= 0")
        check(isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0, "lr", lr,
               "a finite value >= 0")
        super().__init__(params, dict(lr=lr))
        for group in self.param_groups:
            glr = group["lr"]
            check(isinstance(glr, (int, float, Tensor)) and math.isfinite(float(glr))
                   and glr >= 0.0, "lr", glr, "a finite value >= 0")
            for p in group["params"]:
                if p.is_sparse or p.is_complex() or not p.is_floating_point():
                    raise ValueError("Neumann supports dense real floating-point parameters only")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.mu_min = float(mu_min)
        self.mu_max = float(mu_max)
        self.burn_in_steps = burn_in_steps
        self.reset_period = reset_period
        self.mu_period = mu_period
        self.reg_eps = float(reg_eps)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self.num_params = sum(p.numel() for p in self._params)
        self.beta_effective = self.beta * self.num_params
        self._inside_undisplaced = False
        for p in self._params:
            self.state[p]["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.state[p]["v"] = p.detach().clone(memory_format=torch.preserve_format)
        self.state[_STATE] = self._fresh_global()

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
        return {"step": 0, "skipped_steps": 0, "resets": 0,
                "next_reset": 0 if self.reset_period is None else 1,
                "reset_gap": self.reset_period or 0, "mu": 0.0}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["state"][_STATE] = copy.deepcopy(sd["state"][_STATE])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"].get(_STATE)
        if not isinstance(saved, dict) or set(saved) != set(self._fresh_global()):
            raise ValueError("state_dict was not saved by a Neumann optimizer")
        super().load_state_dict(state_dict)
        self.state[_STATE] = copy.deepcopy(saved)
        for p in self._params:
            st = self.state[p]
            for key in ("m", "v"):
                # own, contiguous-as-p storage: never shared with the caller's dict or with p
                st[key] = torch.empty_like(p).copy_(st[key])

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
        flat = [p for ps in active for p in ps]
        if not flat:
            return loss
        grads = [p.grad for p in flat]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Neumann does not support sparse gradients")
        finite = torch.stack([torch.isfinite(n) for n in torch._foreach_norm(grads)]).all()
        if not bool(finite):  # the algorithm branches: one host sync per step
            gst["skipped_steps"] += 1
            return loss

        t = gst["step"] = gst["step"] + 1
        if t <= self.burn_in_steps:
            for group, params in zip(self.param_groups, active):
                if params:
                    torch._foreach_add_(params, [p.grad for p in params], alpha=-group["lr"])
            return loss

        s = t - self.burn_in_steps
        mu = gst["mu"] = mu_schedule(s, self.mu_period, self.mu_min, self.mu_max)
        if s == gst["next_reset"]:  # (i), (ii): only m changes
            for group, params in zip(self.param_groups, active):
                if params:
                    ms = [self.state[p]["m"] for p in params]
                    torch._foreach_mul_(ms, 0.0)
                    torch._foreach_add_(ms, [p.grad for p in params], alpha=-group["lr"])
            gst["next_reset"] = s + gst["reset_gap"]
            gst["reset_gap"] *= 2
            gst["resets"] += 1
            return loss

        coef = self._regulariser_coefficient()
        for group, params in zip(self.param_groups, active):
            if not params:
                continue
            lr = group["lr"]
            ms = [self.state[p]["m"] for p in params]
            vs = [self.state[p]["v"] for p in params]
            d = torch._foreach_sub(params, vs)  # r = w − v
            torch._foreach_mul_(d, coef)
            torch._foreach_add_(d, [p.grad for p in params])  # d = g + c r
            torch._foreach_mul_(ms, mu)
            torch._foreach_add_(ms, d, alpha=-lr)  # m ← μ m − η d
            torch._foreach_add_(params, ms, alpha=mu)
            torch._foreach_add_(params, d, alpha=-lr)  # w ← w + μ m − η d
            torch._foreach_lerp_(vs, params, 1.0 - self.gamma)  # v ← γ v + (1 − γ) w
        return loss

    def _regulariser_coefficient(self) -> Tensor:
        """``α‖r‖ − β_eff/‖r‖³`` with the global ``‖r‖ = ‖w − v‖`` over all parameters."""
        vs = [self.state[p]["v"] for p in self._params]
        dtype = self._params[0].dtype
        for p in self._params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        norms = torch._foreach_norm(torch._foreach_sub(self._params, vs))
        device = self._params[0].device
        r_norm = torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))
        return regulariser_coefficient(r_norm, self.alpha, self.beta_effective, self.reg_eps)

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
        with torch.no_grad():
            saved = [p.detach().clone() for p in self._params]
            if mu != 0.0:
                torch._foreach_add_(self._params, [self.state[p]["m"] for p in self._params],
                                    alpha=-mu)
        self._inside_undisplaced = True
        try:
            yield
        finally:
            self._inside_undisplaced = False
            with torch.no_grad():
                torch._foreach_copy_(self._params, saved)

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
        ms = [self.state[p]["m"] for p in self._params]
        m_norm = math.sqrt(sum(float(n.double()) ** 2 for n in torch._foreach_norm(ms)))
        r = torch._foreach_sub(self._params, [self.state[p]["v"] for p in self._params])
        r_norm = math.sqrt(sum(float(n.double()) ** 2 for n in torch._foreach_norm(r)))
        return {
            "step": gst["step"],
            "neumann_step": max(0, gst["step"] - self.burn_in_steps),
            "in_burn_in": gst["step"] < self.burn_in_steps,
            "skipped_steps": gst["skipped_steps"],
            "resets": gst["resets"],
            "next_reset": gst["next_reset"] or None,
            "mu": gst["mu"],
            "beta_effective": self.beta_effective,
            "displacement_norm": gst["mu"] * m_norm,
            "distance_to_average": r_norm,
        }
