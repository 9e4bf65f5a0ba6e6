"""K-FAC (Martens & Grosse 2015; convolutions: Grosse & Martens 2016), the Kronecker-factored
baseline of the K-BFGS paper; the math and decisions are in docs/kronecker.md; dtypes, AMP,
accumulation and parameter groups in docs/patterns.md."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from secant.layers import add_to_params, homogeneous_inputs, matrix_shape
from secant.linalg.kron import (
    damped_inverse,
    eigen_apply,
    eigen_inverse,
    factored_shifts,
    gram,
    kl_clip_scale,
    sym_eigh,
)
from secant.optim.contract import check_compile, scalars
from secant.optim.layer_optimizer import (
    LayerOptimizer,
    check,
    check_finite_nonneg,
    curvature_step,
)

INVERSE_METHODS = ("eigen", "cholesky")
DAMPING_MODES = ("factored", "exact")
FISHER_TYPES = ("empirical", "sampled")


def _directions(xs: list[Tensor], inverses: list[list[Tensor]],
                dampings: list[float] | Tensor) -> list[Tensor]:
    """``P = G⁻¹ X A⁻¹`` of each layer: ``inverses`` ``[A⁻¹, G⁻¹]`` (factored damping),
    ``[d_A, Q_A, d_G, Q_G]`` (exact damping, with the layer's ``λ``), or empty where this rank
    keeps none (zeros)."""
    out = []
    for x, inv, damping in zip(xs, inverses, dampings):
        if not inv:
            out.append(torch.zeros_like(x))
        elif len(inv) == 2:
            out.append(inv[1] @ x @ inv[0])
        else:
            d_a, q_a, d_g, q_g = inv
            out.append(eigen_apply(q_g, d_g, x, q_a, d_a, damping))
    return out


def _apply_directions(kl_clip: float | None, layers: tuple[nn.Module, ...],
                      momenta: tuple[float, ...], xs: list[Tensor], ps: list[Tensor],
                      moms: list[Tensor], clipped: list[Tensor],
                      lrs: list[float] | Tensor) -> None:
    """KL-clip ``ν`` over all the layers (:func:`~secant.linalg.kron.kl_clip_scale` with
    per-layer ``η²``), ``u ← μ u + ν P`` and ``W̃ ← W̃ − η u`` per layer; ``clipped`` counts
    the steps with ``ν < 1``."""
    nu = None
    if kl_clip is not None:
        same = not isinstance(lrs, Tensor) and len(set(lrs)) == 1
        if same:
            nu = kl_clip_scale(xs, ps, lrs[0], kl_clip)
        else:  # Σ_l η_l² ⟨X_l, P_l⟩ with per-layer learning rates
            nu = kl_clip_scale([x * (lr * lr) for x, lr in zip(xs, lrs)], ps, 1.0, kl_clip)
    for module, momentum, p, u, count, lr in zip(layers, momenta, ps, moms, clipped, lrs):
        u.mul_(momentum)
        if nu is None:
            u.add_(p)
        else:
            u.addcmul_(p, nu)
            count += nu < 1
        add_to_params(module, u, -lr)


def _layer_updates(kl_clip: float | None, layers: tuple[nn.Module, ...],
                   momenta: tuple[float, ...], xs: list[Tensor], inverses: list[list[Tensor]],
                   dampings: list[float] | Tensor, moms: list[Tensor], clipped: list[Tensor],
                   lrs: list[float] | Tensor) -> None:
    """:func:`_directions` then :func:`_apply_directions`, on one process."""
    _apply_directions(kl_clip, layers, momenta, xs, _directions(xs, inverses, dampings), moms,
                      clipped, lrs)


def factor_statistics(module: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """One batch's K-FAC factors of a layer from its input ``x`` and pre-activation grads ``g``.

    With homogeneous inputs ``ā [N, T, d_in+1]`` (``T`` spatial positions, 1 for a plain Linear
    layer) and ``g [N, T, d_out]`` the gradient of the *batch-mean* loss (so ``N·g`` is the
    per-example gradient)::

        A = 1/(N T) Σ_{n,t} ā ā ᵀ          G = 1/N Σ_{n,t} (N g)(N g)ᵀ

    i.e. ``A`` is the mean over examples and positions, ``G`` the mean over examples of the sum
    over positions — the KFC factors ``Ω/|T| ⊗ |T|Γ`` of Grosse & Martens (2016), whose product
    equals ``Ω ⊗ Γ``. For one example of a Linear layer ``A ⊗ G`` is the exact Fisher block.
    """
    a = homogeneous_inputs(module, x)
    n = a.shape[0]
    rows = a.reshape(-1, a.shape[-1])
    big_a = gram(rows, 1.0 / rows.shape[0])
    big_g = gram(g.reshape(-1, g.shape[-1]), float(n))
    return big_a, big_g


class KFAC(LayerOptimizer):
    r"""K-FAC for the ``nn.Linear`` / ``nn.Conv2d`` layers of ``model`` (docs/kronecker.md).

    Use: ``opt = KFAC(model, lr=1e-2, damping=3e-2)``; then each iteration either
    ``opt.zero_grad(); loss.backward(); opt.step()`` or ``loss = opt.step(closure)`` (the closure
    zeroes grads, computes the loss, calls ``backward()`` and returns it). Recommended start:
    ``lr`` 1e-2 to 3e-2 with ``damping=3e-2`` (best learning rates of the harness grids in
    ``benchmarks/tuning.md``); the class defaults are the standard K-FAC code's (1e-3, 1e-3).
    Other modules' parameters get heavy-ball SGD. On factor-update steps every registered layer
    must take part in exactly one forward (in grad mode) and backward; evaluation between steps
    must run under ``torch.no_grad()``.
    Not supported: layers sharing a parameter, frozen biases (``ValueError``; exclude them),
    a layer called twice in one forward (``RuntimeError``), ``damping_mode="exact"`` with
    ``inverse_method="cholesky"``; grouped, ``padding="same"`` or non-zero-padded convs are
    left to the first-order fallback.

    Per supported layer with weight matrix ``W̃ = [W, b]`` (bias = homogeneous coordinate, conv
    weights flattened as ``F.unfold`` patches), every ``factor_update_period`` steps (from the
    first) the factors are updated from the step's forward/backward as exponential moving
    averages with weight ``ε_k = min(1 − 1/k, factor_decay)`` (Martens & Grosse 2015 §5; ``k`` =
    number of factor updates, so the first update takes the batch statistic as is)::

        A ← ε A + (1 − ε) Â,     G ← ε G + (1 − ε) Ĝ           (see :func:`factor_statistics`)

    Every ``inverse_update_period`` steps (from the first) the damped inverses are recomputed in
    at least float32. Direction, with ``X = ∇W̃ + wd·W̃`` (weight decay as an L2 term, so it is
    preconditioned too)::

        damping_mode="factored":  P = (G + √λ/π I)⁻¹ X (A + π√λ I)⁻¹,  π = sqrt((trA/dA)/(trG/dG))
        damping_mode="exact":     vec P = (A ⊗ G + λI)⁻¹ vec X   (eigen path only; the
                                  ``alecwangcq/KFAC-Pytorch`` reference)

    ``inverse_method="eigen"`` decomposes ``A = Q_A diag(d_A) Q_Aᵀ`` (eigenvalues < 1e-10 set
    to 0); ``"cholesky"`` factorises the damped factors (factored damping only). With factored
    damping both store the two damped inverses ``(A + π√λI)⁻¹``, ``(G + √λ/π I)⁻¹`` (so a step
    costs two matrix products per layer); with exact damping the eigenbases are stored and the
    step is ``Q_G[(Q_Gᵀ X Q_A) / (d_G d_Aᵀ + λ)]Q_Aᵀ`` (four products). π and the shifts are fixed
    at each inverse update, so with factored damping a change of ``damping`` takes effect at
    the next one.

    KL-clipping (Ba, Grosse & Martens 2017): ``ν = min(1, sqrt(κ / (η² Σ_l ⟨X_l, P_l⟩)))`` over all
    layers (``kl_clip=None`` disables it). Heavy-ball momentum (as the reference code): ``u ← μ u +
    ν P``, ``W̃ ← W̃ − η u``.

    Fisher: ``fisher="empirical"`` (default) uses the pre-activation gradients of the training
    loss the closure / your loop back-propagates. ``fisher="sampled"`` uses targets drawn from
    the model's predictive distribution: ``fisher_loss(output)`` (for instance
    :func:`secant.layers.sampled_bce_with_logits`) is evaluated on the model's output inside the
    forward pass on factor-update steps and differentiated w.r.t. the layer outputs only (one
    extra partial backward, no effect on ``.grad``). The model's forward must return a Tensor.

    Parameters of unsupported modules (``param_groups[1]``) get heavy-ball SGD with the same
    ``momentum`` and ``weight_decay`` (the same iterates as :class:`torch.optim.SGD`).

    **Distributed** (``process_group``; see :mod:`secant.optim.layer_optimizer`): each rank
    computes its local-batch ``Â``, ``Ĝ`` of every layer on factor-update steps and one flat
    all-reduce averages them (the global-batch factors). Each layer's factors and inverse work
    belong to one rank, balanced by ``d_in³ + d_out³``. ``distributed_mode="memory"`` (default,
    KAISA's memory-optimal mode): only the owner keeps the layer's factors and inverses; each
    step owners compute their layers' directions ``P`` and one flat all-reduce (zeros for other
    ranks' layers) shares them. ``distributed_mode="communication"``: factors stay on the owner,
    but at every inverse update the owners' inverses (or eigenbases) are shared with one flat
    all-reduce and every rank keeps all of them, so the per-step direction exchange disappears
    (more memory, communication only on factor / inverse-update steps). KL-clipping, momentum
    and the update are replicated on every rank. With ``fisher="sampled"`` each rank samples its
    own targets, so runs match a single process only in distribution.

    Use: ``loss.backward(); opt.step()`` or ``loss = opt.step(closure)`` (the closure zeroes
    grads, computes the loss, calls ``backward()`` and returns the loss). Several forward /
    backward passes between two steps (gradient accumulation, each micro-batch loss divided by
    their number ``k``) give factors from the mean of the micro-batch statistics (``Ĝ`` times
    ``k²``, undoing the ``1/k``). bf16 / fp16 models and autocast work (curvature in
    ``factor_dtype``); with ``torch.amp.GradScaler`` pass ``grad_scaler=``. A layer that did not
    run on a factor-update step keeps its factors. Not supported: weight sharing (a layer called
    twice in one forward raises; exclude it), a process group with ``add_param_group``.

    Steady-state steps never synchronise with the device (decisions are device-side masks,
    counters device tensors read by :meth:`diagnostics`), except that ``torch.linalg.eigh``
    checks its own convergence once per inverse update of the eigen path.

    Args (defaults from the standard K-FAC codes, ``alecwangcq/KFAC-Pytorch`` and
    ``gpauloski/kfac-pytorch``):
        model: the model; its supported layers are found by ``named_modules()``.
        lr: learning rate η (1e-3).
        damping: Tikhonov damping λ (1e-3).
        momentum: heavy-ball μ (0.9).
        weight_decay: L2 coefficient (0; the reference applies it after preconditioning).
        factor_decay: EMA cap ``ε`` of the factors (0.95).
        factor_update_period: steps between factor updates, ``T_cov`` (10).
        inverse_update_period: steps between inverse updates, ``T_inv`` (100).
        kl_clip: κ (1e-3) or ``None``.
        inverse_method: ``"eigen"`` (default, as both references) or ``"cholesky"``.
        damping_mode: ``"factored"`` (default; Martens & Grosse) or ``"exact"``.
        fisher: ``"empirical"`` (default) or ``"sampled"`` (needs ``fisher_loss``).
        fisher_loss: function of the model output returning the batch-mean loss at sampled targets.
        exclude: supported modules to leave to the first-order fallback.
        fallback_lr: ``lr`` of the fallback group (default: ``lr``).
        param_groups: per-parameter / per-module options (``lr``, ``damping``, ``momentum``,
            ``weight_decay``), see :mod:`secant.optim.layer_optimizer`.
        factor_dtype: dtype of the curvature state (default: float32 for bf16 / fp16 layers,
            else the parameters' dtype).
        grad_scaler: the ``torch.amp.GradScaler`` whose scale divides the captured gradients.
        process_group: the ranks that share curvature work (default: the default group when
            ``torch.distributed`` is initialised with more than one rank, else none).
        distributed_mode: ``"memory"`` (default) or ``"communication"`` (see above).
        compile: ``True`` (inductor) or a ``torch.compile`` backend name: every step's math
            over all the layers (directions, KL clip, momentum, update) runs as one compiled
            graph, built in the first step and never rebuilt across steps, learning-rate or
            damping changes, factor / inverse updates or ``zero_grad`` choices; equal to eager
            up to rounding. Refused (``ValueError``) with a process group or FSDP2.
    """

    state_key = "kfac"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        damping: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        factor_update_period: int = 10,
        inverse_update_period: int = 100,
        kl_clip: float | None = 1e-3,
        *,
        inverse_method: str = "eigen",
        damping_mode: str = "factored",
        fisher: str = "empirical",
        fisher_loss: Callable[[Tensor], Tensor] | None = None,
        exclude: Iterable[nn.Module] = (),
        fallback_lr: float | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        factor_dtype: torch.dtype | None = None,
        grad_scaler: Any = None,
        process_group: Any = None,
        distributed_mode: str = "memory",
        compile: bool | str = False,  # noqa: A002 (torch.optim's flag style)
    ) -> None:
        check_compile(compile)
        check(isinstance(damping, (int, float)) and damping > 0 and damping < float("inf"),
              "damping", damping, "a finite value > 0")
        check(isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0, "momentum",
              momentum, "a value in [0, 1)")
        check_finite_nonneg("weight_decay", weight_decay)
        check(isinstance(factor_decay, (int, float)) and 0.0 <= factor_decay < 1.0,
              "factor_decay", factor_decay, "a value in [0, 1)")
        for name, v in (("factor_update_period", factor_update_period),
                        ("inverse_update_period", inverse_update_period)):
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v,
                  "an integer >= 1")
        check(kl_clip is None or (isinstance(kl_clip, (int, float)) and kl_clip > 0),
              "kl_clip", kl_clip, "None or a value > 0")
        check(inverse_method in INVERSE_METHODS, "inverse_method", inverse_method,
              f"one of {INVERSE_METHODS}")
        check(damping_mode in DAMPING_MODES, "damping_mode", damping_mode,
              f"one of {DAMPING_MODES}")
        check(not (damping_mode == "exact" and inverse_method != "eigen"), "damping_mode",
              damping_mode, "'factored' with inverse_method='cholesky'")
        check(fisher in FISHER_TYPES, "fisher", fisher, f"one of {FISHER_TYPES}")
        check((fisher == "sampled") == (fisher_loss is not None), "fisher_loss", fisher_loss,
              "a callable exactly when fisher='sampled'")
        self.inverse_method = inverse_method
        self.damping_mode = damping_mode
        self.factor_decay = factor_decay
        self.factor_update_period = factor_update_period
        self.inverse_update_period = inverse_update_period
        self.kl_clip = kl_clip
        self.fisher_loss = fisher_loss
        self.compile = compile
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model, defaults, exclude=exclude, fallback_lr=fallback_lr,
                         param_groups=param_groups, factor_dtype=factor_dtype,
                         grad_scaler=grad_scaler, process_group=process_group,
                         distributed_mode=distributed_mode)
        check(not compile or not (self.distributed or self.sharded), "compile", compile,
              "False with a process group or FSDP2 (their step has collectives between its "
              "parts)")
        self._arm()

    def _setup_description(self) -> str:
        return (f"inverse={self.inverse_method} damping_mode={self.damping_mode} "
                f"decay={self.factor_decay} T_cov={self.factor_update_period} "
                f"T_inv={self.inverse_update_period} kl_clip={self.kl_clip} "
                f"sampled={self.fisher_loss is not None}")

    def _keeps_inverses(self, owned: bool) -> bool:
        """Whether this rank stores (and applies) a layer's inverses."""
        return owned or self.distributed_mode == "communication"

    def _inverse_keys(self) -> tuple[str, ...]:
        return ("d_A", "Q_A", "d_G", "Q_G") if self.damping_mode == "exact" else \
            ("A_inv", "G_inv")

    # ------------------------------------------------------------------ state
    def _fresh_layer_state(self, module: nn.Module, owned: bool) -> dict[str, Any]:
        """Factors, shifts and their counters only on the owner; inverses on the owner (every
        rank in communication mode); momentum and the KL-clip counter on every rank."""
        d_out, d_in = matrix_shape(module)
        w = module.weight
        kw = dict(dtype=self.factor_dtype, device=w.device)
        count = dict(dtype=torch.long, device=w.device)
        st: dict[str, Any] = {}
        if owned:
            st.update(A=torch.eye(d_in, **kw), G=torch.eye(d_out, **kw))
        st["momentum"] = torch.zeros(d_out, d_in, **kw)
        if owned:
            st.update(shift_a=torch.zeros((), **kw), shift_g=torch.zeros((), **kw),
                      stats_rejected=torch.zeros((), **count),
                      inverses_rejected=torch.zeros((), **count))
        st["kl_clip_active"] = torch.zeros((), **count)
        if self._keeps_inverses(owned):
            if self.damping_mode == "exact":
                st.update(d_A=torch.ones(d_in, **kw), Q_A=torch.eye(d_in, **kw),
                          d_G=torch.ones(d_out, **kw), Q_G=torch.eye(d_out, **kw))
            else:
                st.update(A_inv=torch.eye(d_in, **kw), G_inv=torch.eye(d_out, **kw))
        return st

    def _fresh_state(self) -> dict[str, Any]:
        st = super()._fresh_state()
        st["factor_updates"] = 0
        return st

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._arm()

    def _is_factor_step(self, k: int) -> bool:
        return (k - 1) % self.factor_update_period == 0

    @staticmethod
    def _factor_stats(module: nn.Module, rec: Any) -> list[Tensor]:
        """The captured call's ``A`` and ``G`` statistics (a named function: the armed capture
        is pickled with the optimizer)."""
        return list(factor_statistics(module, rec.x, rec.g))

    def _arm(self) -> None:
        """Capture the next step's forward/backward if that step updates the factors."""
        if self.kron_group is not None and self._is_factor_step(self._st["step"] + 1):
            self.capture.start(self._factor_stats, fisher_loss=self.fisher_loss)
        else:
            self.capture.stop()

    # ------------------------------------------------------------------ step
    @curvature_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One K-FAC step; ``closure`` (optional) zeroes grads, computes the loss, calls
        ``backward()`` and returns the loss, which ``step`` returns."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        st = self._st
        k = st["step"] + 1
        if self.kron_group is not None:
            if self._is_factor_step(k):
                self._update_factors(self.capture.collect())
            else:
                self.capture.stop()
            if (k - 1) % self.inverse_update_period == 0:
                self._update_inverses()
            self._layer_step()
        self._fallback_step("heavy_ball")
        st["step"] = k
        self._arm()
        return loss

    def _update_factors(self, records: dict[str, Any]) -> None:
        st = self._st
        st["factor_updates"] += 1
        eps = min(1.0 - 1.0 / st["factor_updates"], self.factor_decay)
        stats: list[Tensor] = []
        for name, (d_out, d_in) in zip(self.layer_names, map(matrix_shape, self.layers)):
            rec, k = records[name], self.capture.last_calls[name]
            if rec is None:  # no data this step: NaN statistics are rejected below
                nan = dict(dtype=self.factor_dtype, device=self._device)
                rec = [torch.full((d_in, d_in), math.nan, **nan),
                       torch.full((d_out, d_out), math.nan, **nan)]
            stats.extend((rec[0], rec[1] * k * k if k > 1 else rec[1]))  # micro-batch 1/k
        stats = self._all_reduce(stats, average=True)  # global-batch statistics
        for i, (own, ls) in enumerate(zip(self._owned, st["layers"])):
            if not own:
                continue
            a_new, g_new = stats[2 * i], stats[2 * i + 1]
            # Gram matrices are finite iff their diagonals are (|M_ij| ≤ sqrt(M_ii M_jj))
            ok = torch.isfinite(a_new.diagonal()).all() & torch.isfinite(g_new.diagonal()).all()
            ls["A"].lerp_(torch.where(ok, a_new, ls["A"]), 1.0 - eps)
            ls["G"].lerp_(torch.where(ok, g_new, ls["G"]), 1.0 - eps)
            if records[self.layer_names[i]] is not None:
                ls["stats_rejected"] += ~ok

    def _update_inverses(self) -> None:
        layers = self._st["layers"]
        for i, (own, ls) in enumerate(zip(self._owned, layers)):
            if not own:
                continue
            damping = self.layer_group(i)["damping"]
            a, g = ls["A"], ls["G"]
            if self.damping_mode == "factored":
                sa, sg = factored_shifts(a, g, damping)
            else:
                sa = sg = torch.zeros((), dtype=a.dtype, device=a.device)
            if self.inverse_method == "eigen":
                d_a, q_a = sym_eigh(a)
                d_g, q_g = sym_eigh(g)
                if self.damping_mode == "exact":
                    new = {"d_A": d_a, "Q_A": q_a, "d_G": d_g, "Q_G": q_g}
                else:
                    new = {"A_inv": eigen_inverse(d_a, q_a, sa),
                           "G_inv": eigen_inverse(d_g, q_g, sg)}
            else:
                new = {"A_inv": damped_inverse(a, sa), "G_inv": damped_inverse(g, sg)}
            # the stored tensors are finite iff these vectors are: the eigenvalues (a failed
            # decomposition is all NaN; A and G are finite) or the inverses' diagonals (a
            # failed Cholesky is all NaN); no full-matrix scan
            probe = (("d_A", "d_G") if self.damping_mode == "exact" else
                     ("A_inv", "G_inv"))
            ok = torch.stack([torch.isfinite(new[key].diagonal() if new[key].dim() == 2
                                             else new[key]).all() for key in probe]).all()
            ok = ok & torch.isfinite(sa) & torch.isfinite(sg)
            for key, val in new.items():
                torch.where(ok, val, ls[key], out=ls[key])
            torch.where(ok, sa, ls["shift_a"], out=ls["shift_a"])
            torch.where(ok, sg, ls["shift_g"], out=ls["shift_g"])
            ls["inverses_rejected"] += ~ok
        if self.distributed and self.distributed_mode == "communication":
            keys = self._inverse_keys()
            mine = [ls[key] if own else torch.zeros_like(ls[key])
                    for own, ls in zip(self._owned, layers) for key in keys]
            shared = iter(self._all_reduce(mine))
            for ls in layers:
                for key in keys:
                    ls[key].copy_(next(shared))

    def _layer_step(self) -> None:
        """Direction, KL-clip, momentum and update of every layer that has a gradient (each
        with its own group's lr / momentum / damping / weight decay): :func:`_directions` and
        :func:`_apply_directions`, one compiled graph with ``compile``."""
        st = self._st
        live = [i for i in range(len(self.layers)) if self._has_grad(i)]
        if not live:
            return
        keys = self._inverse_keys()
        xs = [self._layer_grad(i) for i in live]
        inverses = [[st["layers"][i][key] for key in keys]
                    if self._keeps_inverses(self._owned[i]) else [] for i in live]
        groups = [self.layer_group(i) for i in live]
        hyper = [g[key] for key in ("lr", "damping") for g in groups]
        if self.compile:  # every per-step number as data: no recompilation
            hyper = scalars(hyper, self.factor_dtype, xs[0].device)
        lrs, dampings = hyper[: len(live)], hyper[len(live):]
        layers = tuple(self.layers[i] for i in live)
        momenta = tuple(g["momentum"] for g in groups)
        moms = [st["layers"][i]["momentum"] for i in live]
        clipped = [st["layers"][i]["kl_clip_active"] for i in live]
        if self.distributed and self.distributed_mode == "memory":
            ps = _directions(xs, inverses, dampings)
            ps = self._all_reduce(ps)  # owners' directions, zeros elsewhere: summed = shared
            _apply_directions(self.kl_clip, layers, momenta, xs, ps, moms, clipped, lrs)
            return
        self._compiled(("layers", layers, momenta), _layer_updates)(
            self.kl_clip, layers, momenta, xs, inverses, dampings, moms, clipped, lrs)

    # ------------------------------------------------------------------ reporting
    def diagnostics(self) -> dict[str, Any]:
        """Per-layer counters (this call synchronises with the device): non-finite factor
        statistics rejected, failed inverse updates rejected, steps where KL-clipping scaled the
        update; plus totals and the step / factor-update counts. Distributed: the factor and
        inverse counters are the owner's (0 on other ranks; ``layer_owners`` lists owners)."""
        st = self._st
        out: dict[str, Any] = {"step": st["step"], "factor_updates": st["factor_updates"],
                               "layers": self.layer_names}
        if self.distributed:
            out["layer_owners"] = list(self.layer_owners)
        for key in ("stats_rejected", "inverses_rejected", "kl_clip_active"):
            per = [int(ls[key]) if key in ls else 0 for ls in st["layers"]]
            out[key + "_per_layer"] = per
            out[key] = max(per) if key == "kl_clip_active" and per else sum(per)
        return out
