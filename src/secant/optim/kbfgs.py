"""K-BFGS and K-BFGS(L): Kronecker-factored block-diagonal BFGS / L-BFGS with double damping
(Goldfarb, Ren & Bahamou, NeurIPS 2020, arXiv 2006.08877; ALGORITHMS.md §3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from secant.layers import (
    add_to_params,
    grad_matrix,
    homogeneous_inputs,
    matrix_shape,
    param_matrix,
)
from secant.linalg import (
    History,
    bfgs_inverse_update_,
    cautious_accept,
    compact_apply,
    double_damping,
    push,
)
from secant.linalg.kron import damped_inverse
from secant.optim.layer_optimizer import LayerOptimizer, check, check_finite_nonneg


def _vdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def input_statistics(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean ā āᵀ, mean ā)`` over examples and positions of a layer input (homogeneous)."""
    a = homogeneous_inputs(module, x)
    rows = a.reshape(-1, a.shape[-1])
    return rows.T @ rows / rows.shape[0], rows.mean(0)


class _KroneckerBFGS(LayerOptimizer):
    r"""Shared algorithm of :class:`KBFGS` and :class:`KBFGSL`; subclasses choose how ``H_g`` is
    stored and applied (dense BFGS matrix or L-BFGS history).

    Per supported layer with ``W̃ = [W, b]`` (bias = homogeneous coordinate) and one step ``k``
    on the minibatch ``B`` (ALGORITHMS.md §3.2; the paper's official code):

    1. **Pass 1** (``closure()`` at ``θ_k``): loss, ``∇``, layer inputs ``ā``, the batch means
       ``h̄`` of the pre-activations and ``ḡ = mean_B(g)`` of the per-example pre-activation
       gradients ``g = |B| · ∂loss/∂h``.
    2. ``ĝ ← ρ ĝ + (1 − ρ)(∇W̃ + wd·W̃)`` (``momentum`` ρ = 0.9, from 0);
       ``A ← β A + (1 − β) mean_B(ā āᵀ)`` (``stat_decay`` β = 0.9). On the first step without a
       warm start ``A`` is the batch statistic and ``H_a = (A + √λ I)⁻¹`` (Cholesky); after
       :meth:`warm_start` the first step's EMA update is skipped, as in the paper's code.
    3. ``W̃ ← W̃ − η H_g ĝ H_a`` (Kronecker identity, ALGORITHMS.md §1).
    4. **Pass 2** (``closure()`` again, at ``θ_{k+1}``, on the **same minibatch**): ``h̄⁺, ḡ⁺``;
       ``s = h̄⁺ − h̄``, ``y = ḡ⁺ − ḡ``; ``s̄ ← γ s̄ + (1 − γ) s``, ``ȳ ← γ ȳ + (1 − γ) y``
       (``pair_decay`` γ = 0.9; 0 for full-batch training).
    5. Double damping (:func:`secant.linalg.double_damping`) with ``H_g``, ``μ1 = 0.2``,
       ``μ2 = √λ``; the pair updates ``H_g`` only if ``s̃ᵀỹ > 1e-4 ‖s̃‖² ‖ḡ‖`` (cautious skip)
       and everything is finite.
    6. Hessian-action BFGS of ``H_a``: ``v = mean_B(ā)``, ``s_a = H_a v``,
       ``y_a = (A + √λ I) s_a``, ``H_a ← BFGS(H_a, s_a, y_a)`` under the same cautious test with
       ``‖v‖`` — this keeps ``H_a ≈ (A + √λ I)⁻¹`` without any matrix inversion after the first.

    **Conv2d** (an extension beyond the paper, whose code supports Linear layers only): ``ā``
    are the unfolded patches, ``A`` and ``v`` are means over examples *and* spatial positions,
    ``s`` uses the spatial-and-batch mean of the pre-activations and ``y`` the batch mean of the
    spatial *sum* of the per-example pre-activation gradients. With these scalings ``A ⊗ H_g⁻¹``
    approximates the same curvature as K-FAC's KFC factors (Grosse & Martens 2016), and a Linear
    layer (one position) reduces exactly to the paper.

    Parameters of unsupported modules get the K-BFGS step with identity preconditioner:
    ``θ ← θ − η ĝ`` with the same gradient EMA and weight decay.

    ``step(closure)`` is required: ``closure`` zeroes the gradients, evaluates the loss on the
    current minibatch, calls ``backward()`` and returns the loss; it is called twice per step and
    must use the same minibatch both times (no fresh data, no dropout randomness changing the
    batch). ``step`` returns the pass-1 loss. After ``step`` the ``.grad`` fields hold the
    pass-2 gradients.
    """

    state_key = "kbfgs"

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        momentum: float,
        weight_decay: float,
        stat_decay: float,
        pair_decay: float,
        mu1: float,
        cautious_eps: float,
        exclude: Iterable[nn.Module],
        fallback_lr: float | None,
    ) -> None:
        check(isinstance(damping, (int, float)) and 0.0 < damping < float("inf"), "damping",
              damping, "a finite value > 0")
        for name, v in (("momentum", momentum), ("stat_decay", stat_decay),
                        ("pair_decay", pair_decay)):
            check(isinstance(v, (int, float)) and 0.0 <= v < 1.0, name, v, "a value in [0, 1)")
        check_finite_nonneg("weight_decay", weight_decay)
        check(isinstance(mu1, (int, float)) and 0.0 < mu1 < 1.0, "mu1", mu1,
              "a value in (0, 1)")
        check_finite_nonneg("cautious_eps", cautious_eps)
        self.stat_decay = stat_decay
        self.pair_decay = pair_decay
        self.mu1 = mu1
        self.cautious_eps = cautious_eps
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model, defaults, exclude=exclude, fallback_lr=fallback_lr)

    # ------------------------------------------------------------------ H_g storage
    def _fresh_hg(self, d_out: int, kw: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _apply_hg(self, ls: dict[str, Any], x: Tensor) -> Tensor:
        """``H_g X`` for ``X [d_out, r]``."""
        raise NotImplementedError

    def _update_hg(self, ls: dict[str, Any], s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
        """Apply the pair where ``accept``; return the final acceptance (0-d bool)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def _fresh_layer_state(self, module: nn.Module) -> dict[str, Any]:
        d_out, d_in = matrix_shape(module)
        w = module.weight
        kw = dict(dtype=w.dtype, device=w.device)
        count = dict(dtype=torch.long, device=w.device)
        st: dict[str, Any] = {
            "A": torch.zeros(d_in, d_in, **kw),
            "H_a": torch.eye(d_in, **kw),
            "grad_ema": torch.zeros(d_out, d_in, **kw),
            "s_bar": torch.zeros(d_out, **kw),
            "y_bar": torch.zeros(d_out, **kw),
        }
        st.update(self._fresh_hg(d_out, kw))
        for key in ("g_pairs_accepted", "g_pairs_rejected", "a_updates_accepted",
                    "a_updates_rejected", "dd_step1_active", "dd_step2_active",
                    "stats_rejected"):
            st[key] = torch.zeros((), **count)
        return st

    def _fresh_state(self) -> dict[str, Any]:
        st = super()._fresh_state()
        st["a_initialized"] = False
        st["warm_started"] = False
        return st

    # ------------------------------------------------------------------ warm start
    @torch.no_grad()
    def warm_start(self, batches: Iterable[Any],
                   forward: Callable[[Any], Any] | None = None) -> int:
        """Initialise ``A`` by one pass over ``batches`` at the current parameters (paper §3.2).

        ``A`` is the average over batches of ``mean_B(ā āᵀ)``, then ``H_a = (A + √λ I)⁻¹``.
        ``forward(batch)`` runs the model on a batch (default: ``model(batch[0])`` for tuples /
        lists, else ``model(batch)``). Runs without gradients. Returns the number of batches.
        """
        if self.kron_group is None:
            return 0
        model = self.model

        def default_forward(b: Any) -> Any:
            return model(b[0] if isinstance(b, (tuple, list)) else b)

        fwd = forward or default_forward
        sums = [torch.zeros_like(ls["A"]) for ls in self._st["layers"]]
        n = 0
        with self.capture.warm():
            for batch in batches:
                self.capture.start(inputs=True, grads=False)
                fwd(batch)
                recs = self.capture.collect()
                for name, module, acc in zip(self.layer_names, self.layers, sums):
                    acc.add_(input_statistics(module, recs[name].x)[0])
                n += 1
        if n == 0:
            raise ValueError("warm_start got no batches")
        lam_a = math.sqrt(self.kron_group["damping"])
        for ls, acc in zip(self._st["layers"], sums):
            ls["A"].copy_(acc / n)
            ls["H_a"].copy_(damped_inverse(ls["A"], lam_a))
        self._st["a_initialized"] = True
        self._st["warm_started"] = True
        return n

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One K-BFGS step; ``closure`` is required (see the class docstring)."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure: K-BFGS evaluates the same "
                "minibatch twice per step. Call opt.step(closure) where closure() zeroes grads, "
                "computes the loss on the current batch, calls backward() and returns the loss.")
        st = self._st
        k = st["step"] + 1
        group = self.kron_group
        if group is not None:
            self.capture.start(h_mean=True)
        try:
            with torch.enable_grad():
                loss = closure()
            recs1 = self.capture.collect() if group is not None else {}
        finally:
            self.capture.stop()
        if group is not None:
            pass1 = self._first_half(group, recs1, skip_a=(k == 1 and st["warm_started"]))
        self._fallback_step("ema", self.fallback_group["momentum"] if self.fallback_group
                            else 0.0)
        if group is not None:
            self.capture.start(inputs=False, h_mean=True)
            try:
                with torch.enable_grad():
                    closure()
                recs2 = self.capture.collect()
            finally:
                self.capture.stop()
            self._second_half(group, pass1, recs2)
        st["step"] = k
        return loss

    def _first_half(self, group: dict[str, Any], recs: dict[str, Any], skip_a: bool
                    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        st = self._st
        lr, wd, rho = group["lr"], group["weight_decay"], group["momentum"]
        lam_a = math.sqrt(group["damping"])
        first = not st["a_initialized"]
        saved = []
        for name, module, ls in zip(self.layer_names, self.layers, st["layers"]):
            rec = recs[name]
            a_new, v = input_statistics(module, rec.x)
            g_sum = rec.g.sum(dim=(0, 1))  # = mean over examples of the per-example spatial sum
            # a Gram matrix is finite iff its diagonal is (|A_ij| ≤ sqrt(A_ii A_jj))
            ok = torch.isfinite(a_new.diagonal()).all() & torch.isfinite(v).all()
            ls["stats_rejected"] += ~ok
            if first:
                ls["A"].copy_(torch.where(ok, a_new, ls["A"]))
                ls["H_a"].copy_(torch.where(ok, damped_inverse(ls["A"], lam_a), ls["H_a"]))
            elif not skip_a:
                ls["A"].lerp_(torch.where(ok, a_new, ls["A"]), 1.0 - self.stat_decay)
            x = grad_matrix(module)
            if wd:
                x.add_(param_matrix(module), alpha=wd)
            ls["grad_ema"].lerp_(x, 1.0 - rho)
            p = self._apply_hg(ls, ls["grad_ema"]) @ ls["H_a"]
            add_to_params(module, p, -lr)
            saved.append((rec.h_mean, g_sum, v, ok))
        st["a_initialized"] = True
        return saved

    def _second_half(self, group: dict[str, Any], pass1: list, recs: dict[str, Any]) -> None:
        root = math.sqrt(group["damping"])
        c = self.pair_decay
        for name, ls, (h1, g1, v, ok_stats) in zip(self.layer_names, self._st["layers"], pass1):
            rec = recs[name]
            s = rec.h_mean - h1
            y = rec.g.sum(dim=(0, 1)) - g1
            finite = torch.isfinite(s).all() & torch.isfinite(y).all()
            ls["s_bar"].copy_(torch.where(finite, c * ls["s_bar"] + (1 - c) * s, ls["s_bar"]))
            ls["y_bar"].copy_(torch.where(finite, c * ls["y_bar"] + (1 - c) * y, ls["y_bar"]))
            sb, yb = ls["s_bar"], ls["y_bar"]
            hy = self._apply_hg(ls, yb.unsqueeze(1)).squeeze(1)
            st_, yt = double_damping(sb, yb, hy, self.mu1, root)
            ls["dd_step1_active"] += _vdot(sb, yb) < self.mu1 * _vdot(yb, hy)
            ls["dd_step2_active"] += _vdot(st_, yb) < root * _vdot(st_, st_)
            accept = finite & cautious_accept(st_, yt, torch.linalg.vector_norm(g1),
                                              self.cautious_eps)
            accept = self._update_hg(ls, st_, yt, accept)
            ls["g_pairs_accepted"] += accept
            ls["g_pairs_rejected"] += ~accept
            # Hessian-action BFGS of H_a with the (already EMA-updated) A
            h_a = ls["H_a"]
            s_a = h_a @ v
            y_a = ls["A"] @ s_a + root * s_a
            acc_a = ok_stats & cautious_accept(s_a, y_a, torch.linalg.vector_norm(v),
                                               self.cautious_eps)
            acc_a = bfgs_inverse_update_(h_a, s_a, y_a, acc_a)
            ls["a_updates_accepted"] += acc_a
            ls["a_updates_rejected"] += ~acc_a

    # ------------------------------------------------------------------ reporting
    def diagnostics(self) -> dict[str, Any]:
        """Per-layer counters (synchronises with the device): G pairs accepted / rejected
        (cautious skip or non-finite), H_a Hessian-action updates accepted / rejected, double-
        damping activations of step 1 (Powell on H) and step 2 (Powell with B = I), non-finite
        input statistics rejected; totals alongside."""
        st = self._st
        out: dict[str, Any] = {"step": st["step"], "layers": self.layer_names,
                               "warm_started": st["warm_started"]}
        for key in ("g_pairs_accepted", "g_pairs_rejected", "a_updates_accepted",
                    "a_updates_rejected", "dd_step1_active", "dd_step2_active",
                    "stats_rejected"):
            per = [int(ls[key]) for ls in st["layers"]]
            out[key + "_per_layer"] = per
            out[key] = sum(per)
        out["pairs_accepted"] = out["g_pairs_accepted"]
        out["pairs_rejected"] = out["g_pairs_rejected"]
        return out


class KBFGS(_KroneckerBFGS):
    r"""K-BFGS: ``H_g`` is a dense ``d_out × d_out`` BFGS matrix, started at ``I`` and updated
    by :func:`secant.linalg.bfgs_inverse_update` with each accepted double-damped pair.

    The algorithm (shared with :class:`KBFGSL`) follows below; use ``loss = opt.step(closure)``.

    Args (defaults: the paper's official code and its MNIST Demo, ALGORITHMS.md §3.2, §3.5):
        model: the model; its ``nn.Linear`` / ``nn.Conv2d`` layers are found automatically.
        lr: step size α (0.3, Demo MNIST; constant in the paper).
        damping: λ (0.3, Demo MNIST); ``√λ`` damps A (``H_a ≈ (A + √λ I)⁻¹``) and is μ2 of DD.
        momentum: gradient-EMA factor ρ (0.9).
        weight_decay: L2 τ added to the gradient (1e-5).
        stat_decay: EMA factor β of A (0.9).
        pair_decay: EMA factor of (s, y) (0.9; use 0 for full-batch training).
        mu1: μ1 of double damping (0.2).
        cautious_eps: ε of the cautious skip (1e-4).
        exclude: supported modules left to the first-order fallback.
        fallback_lr: ``lr`` of the fallback group (default: ``lr``).
    """

    __doc__ = (__doc__ or "") + "\n" + (_KroneckerBFGS.__doc__ or "")

    def __init__(self, model: nn.Module, lr: float = 0.3, damping: float = 0.3,
                 momentum: float = 0.9, weight_decay: float = 1e-5, stat_decay: float = 0.9,
                 pair_decay: float = 0.9, mu1: float = 0.2, cautious_eps: float = 1e-4, *,
                 exclude: Iterable[nn.Module] = (), fallback_lr: float | None = None) -> None:
        super().__init__(model, lr, damping, momentum, weight_decay, stat_decay, pair_decay,
                         mu1, cautious_eps, exclude, fallback_lr)

    def _fresh_hg(self, d_out: int, kw: dict[str, Any]) -> dict[str, Tensor]:
        return {"H_g": torch.eye(d_out, **kw)}

    def _apply_hg(self, ls: dict[str, Any], x: Tensor) -> Tensor:
        return ls["H_g"] @ x

    def _update_hg(self, ls: dict[str, Any], s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
        return bfgs_inverse_update_(ls["H_g"], s, y, accept)


class KBFGSL(_KroneckerBFGS):
    r"""K-BFGS(L): ``H_g`` is the L-BFGS operator of the last ``history_size`` accepted pairs with
    ``H₀ = I`` (γ fixed to 1, as the paper), kept in the shared ring-buffer history of
    :mod:`secant.linalg.lbfgs` (one block, ``c = d_out``) and applied in the compact form
    (:func:`secant.linalg.compact_apply`). Memory per layer: ``2·history_size·d_out`` instead of
    ``d_out²``.

    Args: as :class:`KBFGS`, plus ``history_size`` (100, the paper's code).
    """

    __doc__ = (__doc__ or "") + "\n" + (_KroneckerBFGS.__doc__ or "")

    def __init__(self, model: nn.Module, lr: float = 0.3, damping: float = 0.3,
                 history_size: int = 100, momentum: float = 0.9, weight_decay: float = 1e-5,
                 stat_decay: float = 0.9, pair_decay: float = 0.9, mu1: float = 0.2,
                 cautious_eps: float = 1e-4, *, exclude: Iterable[nn.Module] = (),
                 fallback_lr: float | None = None) -> None:
        check(isinstance(history_size, int) and not isinstance(history_size, bool)
              and history_size >= 1, "history_size", history_size, "an integer >= 1")
        self.history_size = history_size
        super().__init__(model, lr, damping, momentum, weight_decay, stat_decay, pair_decay,
                         mu1, cautious_eps, exclude, fallback_lr)

    def _fresh_hg(self, d_out: int, kw: dict[str, Any]) -> dict[str, Tensor]:
        m = self.history_size
        dev = kw["device"]
        return {
            "hist_z": torch.zeros(1, 2 * m, d_out, **kw),
            "hist_gram": torch.zeros(1, 2 * m, 2 * m, **kw),
            "hist_head": torch.zeros(1, dtype=torch.long, device=dev),
            "hist_count": torch.zeros(1, dtype=torch.long, device=dev),
        }

    @staticmethod
    def _history(ls: dict[str, Any]) -> History:
        z = ls["hist_z"]
        return History(z, ls["hist_gram"], ls["hist_head"], ls["hist_count"],
                       torch.zeros(1, dtype=torch.long, device=z.device))

    def _apply_hg(self, ls: dict[str, Any], x: Tensor) -> Tensor:
        h = self._history(ls)
        one = torch.ones(1, dtype=x.dtype, device=x.device)
        return compact_apply(h, x.T.unsqueeze(0), one)[0].T

    def _update_hg(self, ls: dict[str, Any], s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
        push(self._history(ls), s.unsqueeze(0), y.unsqueeze(0), accept.view(1))
        return accept

    def diagnostics(self) -> dict[str, Any]:
        """As :meth:`KBFGS.diagnostics`, plus ``history_length`` per layer."""
        out = super().diagnostics()
        out["history_length"] = [int(ls["hist_count"]) for ls in self._st["layers"]]
        return out
