"""K-BFGS and K-BFGS(L): Kronecker-factored block-diagonal BFGS / L-BFGS with double damping
(Goldfarb, Ren & Bahamou, NeurIPS 2020, arXiv 2006.08877); the math and decisions are in
docs/kronecker.md; dtypes, accumulation and parameter groups in docs/patterns.md."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from secant.distributed import full, local, local_rows
from secant.layers import (
    layer_params,
    matrix_rows,
    matrix_shape,
    weight_layout,
    weight_matrix,
)
from secant.linalg import (
    History,
    bfgs_inverse_update_,
    cautious_accept,
    compact_apply,
    double_damping,
    push,
)
from secant.linalg.bfgs import rows_finite
from secant.linalg.kron import damped_inverse, gram
from secant.linalg.lbfgs import dense_inverse
from secant.linalg.products import matvec
from secant.optim import layer_state
from secant.optim.contract import check_compile
from secant.optim.layer_optimizer import (
    LayerOptimizer,
    check,
    check_finite_nonneg,
    curvature_step,
)
from secant.optim.layer_stacks import LayerStack, plan

A_INITS = ("statistic", "zero")
_EYE = frozenset({"H_a", "H_g"})  # padded by the identity in a stack


def _masked(flags: Tensor, mask: Tensor | None) -> Tensor:
    """``flags & mask``; ``flags`` where there is no mask (see :meth:`_KroneckerBFGS._flags`)."""
    return flags if mask is None else flags & mask


def _history(t: dict[str, Tensor]) -> History:
    """The L-BFGS rings of a K-BFGS(L) stack ``t``: each layer's ``[1, ...]`` ring as one block
    of the stack's ``[L, ...]``."""
    z = t["hist_z"].squeeze(1)
    return History(z, t["hist_gram"].squeeze(1), t["hist_head"].squeeze(1),
                   t["hist_count"].squeeze(1), torch.arange(z.shape[0], device=z.device))


def _compact_hg(t: dict[str, Tensor], x: Tensor) -> Tensor:
    """``H_g X`` for ``X [L, O, r]`` by the compact form of the rings of the stack ``t``."""
    return compact_apply(_history(t), x.mT, x.new_ones(x.shape[0])).mT


def _update_hg(t: dict[str, Tensor], s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
    """The pairs ``[L, O]`` where ``accept [L]``: a BFGS update of the dense ``H_g`` (K-BFGS,
    ``dense_hg``) or a push onto the rings; returns the final acceptance."""
    if "H_g" in t:
        return bfgs_inverse_update_(t["H_g"], s, y, accept)
    push(_history(t), s, y, accept)
    return accept


def _pair_updates(t: dict[str, Tensor], h1: Tensor, g1: Tensor, v: Tensor, ok: Tensor,
                  h2: Tensor, g2: Tensor, hg: Tensor | None, alive: Tensor | None,
                  pair_decay: float, mu1: float, root: float, eps: float) -> None:
    """Steps 4–6 of a K-BFGS step for the stack ``t`` (its tensors, updated in place), one
    batched op each: ``s = h̄⁺ − h̄``, ``y = ḡ⁺ − ḡ`` and their averages where finite, double
    damping against ``H_g`` (``hg``, or its compact form), the cautious tests, the ``H_g``
    update, the Hessian-action update of ``H_a``, and the counters. ``ok [L]``: the pass-1
    statistic sets that are finite; ``alive [L]`` (or ``None``: all): the layers in this
    step. A pure function of tensors and numbers, so ``compile=`` can make it one graph."""
    s, y = h2 - h1, g2 - g1
    finite = _masked(ok & rows_finite(s, y), alive)  # pass 1's set, then pass 2's h̄⁺, ḡ⁺
    sb, yb = t["s_bar"], t["y_bar"]
    keep = finite.unsqueeze(1)
    torch.where(keep, torch.lerp(sb, s, 1 - pair_decay), sb, out=sb)
    torch.where(keep, torch.lerp(yb, y, 1 - pair_decay), yb, out=yb)
    hy = matvec(hg, yb) if hg is not None else _compact_hg(t, yb.unsqueeze(2)).squeeze(2)
    st_, yt, step1, step2 = double_damping(sb, yb, hy, mu1, root)
    t["dd_step1_active"] += _masked(step1, alive)
    t["dd_step2_active"] += _masked(step2, alive)
    accept = finite & cautious_accept(st_, yt, torch.linalg.vector_norm(g1, dim=1), eps)
    accept = _update_hg(t, st_, yt, accept)
    t["g_pairs_accepted"] += accept
    t["g_pairs_rejected"] += _masked(~accept, alive)
    # Hessian-action BFGS of H_a with the (already EMA-updated) A
    h_a = t["H_a"]
    s_a = matvec(h_a, v)
    y_a = root * s_a + matvec(t["A"], s_a)
    acc_a = _masked(ok, alive) & cautious_accept(s_a, y_a, torch.linalg.vector_norm(v, dim=1),
                                                 eps)
    acc_a = bfgs_inverse_update_(h_a, s_a, y_a, acc_a)
    t["a_updates_accepted"] += acc_a
    t["a_updates_rejected"] += _masked(~acc_a, alive)


def input_statistics(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean ā āᵀ, mean ā)`` over examples and positions of a layer input (homogeneous: the
    1 of a biased layer's ``ā`` is added by :func:`~secant.linalg.kron.gram`, not stored)."""
    rows = matrix_rows(module, x, inputs=True)
    if module.bias is None:
        return gram(rows, 1.0 / rows.shape[0]), rows.mean(0)
    stat = gram(rows, 1.0 / rows.shape[0], ones=True)
    return stat, stat[-1]  # the last row of mean ā āᵀ is mean ā (its last entry: 1)


def _matrix(module: nn.Module, p: Tensor) -> Tensor:
    """A layer parameter (or a tensor shaped like it): the weight as ``[d_out, d_in]`` (a view
    of a contiguous one), the bias as it is."""
    return weight_matrix(module, p) if p.dim() > 1 else p


def _whole(p: Tensor, wd: float) -> tuple[Tensor | None, Tensor | None]:
    """``(∇θ, θ)`` whole for the gradient average (``θ`` only with weight decay ``wd``): the
    tensors themselves, or gathered under FSDP2, where a sharded ``θ`` with a gradient sends
    ``∇θ + wd·θ`` in one gather instead (returned as the gradient, with no ``θ``)."""
    if isinstance(p, DTensor) and wd and p.grad is not None:
        return full(p.grad + wd * p.detach()), None
    return (None if p.grad is None else full(p.grad)), (full(p) if wd else None)


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """The CPU generator's state and, once CUDA is in use, every GPU generator's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class _KroneckerBFGS(LayerOptimizer):
    r"""Shared algorithm of :class:`KBFGS` and :class:`KBFGSL`; subclasses choose how ``H_g`` is
    stored and applied (dense BFGS matrix or L-BFGS history).

    Per supported layer with ``W̃ = [W, b]`` (bias = homogeneous coordinate) and one step ``k``
    on the minibatch ``B`` (docs/kronecker.md; the paper's official code):

    1. **Pass 1** (``closure()`` at ``θ_k``): loss, ``∇``, layer inputs ``ā``, the batch means
       ``h̄`` of the pre-activations and ``ḡ = mean_B(g)`` of the per-example pre-activation
       gradients ``g = |B| · ∂loss/∂h``.
    2. ``ĝ ← ρ ĝ + (1 − ρ)(∇W̃ + wd·W̃)`` (``momentum`` ρ = 0.9, from 0);
       ``A ← β A + (1 − β) mean_B(ā āᵀ)`` (``stat_decay`` β = 0.9). On the first step without a
       warm start ``A`` is the batch statistic and ``H_a = (A + √λ I)⁻¹`` (Cholesky); after
       :meth:`warm_start` the first step's EMA update is skipped, as in the paper's code;
       ``a_init="zero"`` starts instead from ``(1 − β)·statistic`` (a zero-started average, the
       authors' full-batch setting).
    3. ``W̃ ← W̃ − η H_g ĝ H_a`` (Kronecker identity).
    4. **Pass 2** (``closure()`` again, at ``θ_{k+1}``, on the **same minibatch**): ``h̄⁺, ḡ⁺``;
       ``s = h̄⁺ − h̄``, ``y = ḡ⁺ − ḡ``; ``s̄ ← γ s̄ + (1 − γ) s``, ``ȳ ← γ ȳ + (1 − γ) y``
       (``pair_decay`` γ = 0.9; 0 for full-batch training).
    5. Double damping (:func:`secant.linalg.double_damping`) with ``H_g``, ``μ1 = 0.2``,
       ``μ2 = √λ``; the pair updates ``H_g`` only if ``s̃ᵀỹ > 1e-4 ‖s̃‖² ‖ḡ‖`` (cautious skip)
       and everything is finite.
    6. Hessian-action BFGS of ``H_a``: ``v = mean_B(ā)``, ``s_a = H_a v``,
       ``y_a = (A + √λ I) s_a``, ``H_a ← BFGS(H_a, s_a, y_a)`` under the same cautious test with
       ``‖v‖`` — this keeps ``H_a ≈ (A + √λ I)⁻¹`` without any matrix inversion after the first.

    With ``curvature_update_period=T > 1`` only steps ``k ≡ 1 (mod T)`` run all six; the others
    run pass 1 without capturing statistics and steps 2–3 for ``ĝ`` alone (``A``, ``H_a``,
    ``H_g``, ``s̄``, ``ȳ`` unchanged), as K-FAC amortises its factors: one closure call and no
    curvature work on ``T − 1`` of every ``T`` steps.

    Non-finite statistics (an overflow, a NaN loss) never reach the state, and no test syncs
    with the host: the pass-1 statistics ``(A, v, h̄, ḡ)`` of a layer carry one finiteness flag
    (:func:`secant.linalg.bfgs.rows_finite`; ``A`` through its diagonal), which gates ``A``,
    ``H_a`` and the pair, and the pair ``(s, y)`` a second one; counted in ``stats_rejected`` and
    ``g_pairs_rejected``.

    **Layer stacks**: the state of layers of one parameter group and kind lives in padded
    stacked tensors (:mod:`secant.optim.layer_stacks`; docs/kronecker.md, "Layer stacks"), and
    steps 2 and 4–6 run as batched ops over each stack, so the ops a step dispatches for them do
    not grow with the number of layers; ``opt.state[...]["layers"][i]`` holds views of layer
    ``i``'s corner of the stacks.

    **Conv2d** (an extension beyond the paper, whose code supports Linear layers only): ``ā``
    are the unfolded patches, ``A`` and ``v`` are means over examples *and* spatial positions,
    ``s`` uses the spatial-and-batch mean of the pre-activations and ``y`` the batch mean of the
    spatial *sum* of the per-example pre-activation gradients. With these scalings ``A ⊗ H_g⁻¹``
    approximates the same curvature as K-FAC's KFC factors (Grosse & Martens 2016), and a Linear
    layer (one position) reduces exactly to the paper.

    Parameters of unsupported modules get the K-BFGS step with identity preconditioner:
    ``θ ← θ − η ĝ`` with the same gradient EMA and weight decay.

    **Distributed** (``process_group``; see :mod:`secant.optim.layer_optimizer`): in each pass
    every rank computes its local-batch statistics of every layer (``mean ā āᵀ``, ``mean ā``,
    ``h̄``, ``ḡ``) and one flat all-reduce averages them, so ``A``, ``s``, ``y`` and the cautious-
    skip norms are the global-batch quantities. Layers are owned by one rank each, balanced by
    the cost of the direction ``d_out·d_in·(d_out + d_in)``. ``distributed_mode="memory"``
    (default): only the owner keeps a layer's ``A``, ``H_a``, ``H_g`` (or L-BFGS history),
    ``s̄``, ``ȳ`` and gradient EMA and does its BFGS updates; the directions are shared with one
    flat all-reduce per step (three collectives per step in all). ``distributed_mode=
    "communication"``: every rank keeps and updates every layer's state (replicated, identical
    work), so the direction exchange disappears (two collectives per step). An owner-plus-
    broadcast variant, as K-FAC's communication mode, would not help here: ``H_a`` and ``H_g``
    change every step, so broadcasting them would cost more than sharing the directions.
    :meth:`warm_start` averages its statistics over the ranks (one all-reduce; every rank must
    call it with the same number of equally sized local batches).

    ``step(closure)`` is required: ``closure`` zeroes the gradients, evaluates the loss on the
    current minibatch, calls ``backward()`` and returns the loss; it is called twice per step and
    must use the same minibatch both times (no fresh data). The random number generators (CPU,
    and every GPU once CUDA is in use) are set back before pass 2 to their state before pass 1,
    so dropout draws the same masks in both passes. ``step`` returns the pass-1 loss, detached.
    Pass 2 computes no parameter gradient (only pre-activation gradients; this optimizer's
    parameters do not require grad while it runs), so after ``step`` the ``.grad`` fields hold
    the pass-1 gradients, the ones the step used.
    BatchNorm running statistics are restored after pass 2, so a step moves them once.
    Gradient accumulation: run all micro-batches inside the closure (each loss divided by
    their number ``k``); the statistics are their means (``ḡ`` times ``k``).
    bf16 / fp16 parameters and autocast work (curvature in ``factor_dtype``);
    ``torch.amp.GradScaler`` does not (it refuses closures): ``grad_scaler=`` raises
    ``ValueError``, use bf16 autocast. A layer without data in a pass gets no curvature update;
    one without gradient no update. Weight sharing is refused (exclude the layer).
    """

    state_key = "kbfgs"
    needs_closure = True

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
        process_group: Any = None,
        distributed_mode: str = "memory",
        a_init: str = "statistic",
        curvature_update_period: int = 1,
        compile: bool | str = False,  # noqa: A002 (torch.optim's flag style)
        **layer_options: Any,
    ) -> None:
        scaler = layer_options.get("grad_scaler")
        check(scaler is None or not scaler.is_enabled(), "grad_scaler", scaler,
              "None: K-BFGS evaluates its closure twice per step and torch.amp.GradScaler "
              "does not support closures; train in bf16 autocast (no scaler needed) or use KFAC")
        check(isinstance(damping, (int, float)) and 0.0 < damping < float("inf"), "damping",
              damping, "a finite value > 0")
        for name, v in (("momentum", momentum), ("stat_decay", stat_decay),
                        ("pair_decay", pair_decay)):
            check(isinstance(v, (int, float)) and 0.0 <= v < 1.0, name, v, "a value in [0, 1)")
        check_finite_nonneg("weight_decay", weight_decay)
        check(isinstance(mu1, (int, float)) and 0.0 < mu1 < 1.0, "mu1", mu1,
              "a value in (0, 1)")
        check_finite_nonneg("cautious_eps", cautious_eps)
        check(a_init in A_INITS, "a_init", a_init, f"one of {A_INITS}")
        check(isinstance(curvature_update_period, int)
              and not isinstance(curvature_update_period, bool) and curvature_update_period >= 1,
              "curvature_update_period", curvature_update_period, "an integer >= 1")
        check_compile(compile)
        self.compile = compile
        self.a_init = a_init
        self.curvature_update_period = curvature_update_period
        self.stat_decay = stat_decay
        self.pair_decay = pair_decay
        self.mu1 = mu1
        self.cautious_eps = cautious_eps
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        self._stacked: tuple[list, int] | None = None  # the layer list the stacks hold
        super().__init__(model, defaults, exclude=exclude, fallback_lr=fallback_lr,
                         process_group=process_group, distributed_mode=distributed_mode,
                         **layer_options)
        self._stacks  # noqa: B018 - the per-layer state becomes views of the stacks now

    # ------------------------------------------------------------------ distributed
    def _layer_cost(self, d_out: int, d_in: int) -> int:
        return d_out * d_in * (d_out + d_in)

    def _setup_description(self) -> str:
        return (f"stat_decay={self.stat_decay} pair_decay={self.pair_decay} mu1={self.mu1} "
                f"cautious_eps={self.cautious_eps} a_init={self.a_init} "
                f"curvature_update_period={self.curvature_update_period} "
                f"history_size={getattr(self, 'history_size', None)} "
                f"dense_hg={getattr(self, 'dense_hg', None)}")

    def _works(self, owned: bool) -> bool:
        """Whether this rank keeps a layer's curvature state and does its work."""
        return owned or self.distributed_mode == "communication"

    # ------------------------------------------------------------------ H_g storage
    def _fresh_hg(self, d_out: int, kw: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _hg_matrix(self, stack: LayerStack) -> Tensor | None:
        """``H_g`` of the stack's layers as dense ``[L, O, O]`` matrices for this step's two
        products with it (the direction, then ``H_g ȳ`` in the double damping, before the pair
        updates it), or ``None`` where it is applied in the compact form
        (:func:`_compact_hg`); the ``hg`` argument of :func:`_pair_updates`."""
        raise NotImplementedError

    def _stack_kind(self, ls: dict[str, Tensor]) -> Hashable:
        """What layers must share to share a stack, beyond their state's names and their
        parameter group (e.g. how their ``H_g`` is applied)."""
        return None

    @property
    def _stacks(self) -> list[LayerStack]:
        """The stacks (:mod:`secant.optim.layer_stacks`) of the layers this rank works on,
        by parameter group and kind; built at construction, and again after
        :meth:`load_state_dict`, ``add_param_group`` or a copy, which replace the per-layer
        tensors."""
        layers = self._st["layers"]
        if self._stacked is None or self._stacked[0] is not layers \
                or self._stacked[1] != len(layers):
            work = [i for i, ls in enumerate(layers) if ls]
            kinds = [(self._layer_groups[i][0], tuple(layers[i]), self._stack_kind(layers[i]))
                     for i in work]
            shapes = [{k: tuple(t.shape) for k, t in layers[i].items()} for i in work]
            self._stack_list = [
                LayerStack([work[j] for j in idx], [layers[work[j]] for j in idx], _EYE)
                for idx in plan(shapes, kinds)]
            self._stacked = (layers, len(layers))
            self.__dict__.pop("_compiled_fns", None)  # graphs of the old stacks
        return self._stack_list

    def _add_direction(self, views: dict[str, Any], hg_x: list[Tensor],
                       targets: list[Tensor], alpha: float) -> None:
        """``targets += alpha · P`` with ``P = H_g X H_a``, ``targets = [T_W, t_b]`` (matrix
        views of ``layer_params``), ``[T]`` without bias; ``hg_x``: ``H_g`` times the blocks of
        ``X = [X_W, x_b]``; ``views``: the layer's from :meth:`_views`. With
        ``H_a = [[H, h], [h′ᵀ, η]]``: ``P_W = (H_g X_W) H + (H_g x_b) h′ᵀ`` and
        ``p_b = (H_g X_W) h + η H_g x_b`` — the same product, but the GEMMs run on the even
        ``d_out × d_in`` shapes instead of the odd ``d_in + 1`` ones, which one CPU thread
        multiplies ≈ 1.5× slower, and accumulate straight into the targets (no temporary
        ``P``; docs/kronecker.md)."""
        if len(targets) == 1:
            targets[0].addmm_(hg_x[0], views["h_a"], alpha=alpha)
            return
        y_w, y_b = hg_x
        t_w, t_b = targets
        t_w.addmm_(y_w, views["h"], alpha=alpha).addr_(y_b, views["h_row"], alpha=alpha)
        t_b.addmv_(y_w, views["h_col"], alpha=alpha).addcmul_(y_b, views["eta"], value=alpha)

    # ------------------------------------------------------------------ state
    def _fresh_layer_state(self, module: nn.Module, owned: bool) -> dict[str, Any]:
        """Everything per layer, on the ranks that work on it (an empty dict elsewhere)."""
        if not self._works(owned):
            return {}
        d_out, d_in = matrix_shape(module)
        w = module.weight
        kw = dict(dtype=self.factor_dtype, device=w.device)
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

    def __getstate__(self) -> dict[str, Any]:
        """Each layer's tensors copied out of the stacks (a pickle keeps no storage twice, and
        no view survives unpickling as a view); the copy rebuilds its stacks from them when it
        first needs them."""
        state = super().__getstate__()
        st = dict(self._st)
        st["layers"] = [{k: layer_state.own_storage(v) for k, v in ls.items()}
                        for ls in st["layers"]]
        state["state"] = copy.copy(self.state)
        state["state"][self.state_key] = st
        return state | {"_stack_list": [], "_stacked": None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._stacks  # noqa: B018 - the loaded tensors become views of new stacks

    # ------------------------------------------------------------------ warm start
    @torch.no_grad()
    def warm_start(self, batches: Iterable[Any],
                   forward: Callable[[Any], Any] | None = None, *,
                   max_batches: int | None = None) -> int:
        """Initialise ``A`` from one pass over ``batches`` at the current parameters, as the
        paper does before training (docs/kronecker.md, "Warm start").

        ``A`` becomes the average over the batches of ``mean_B(ā āᵀ)`` and
        ``H_a = (A + √λ I)⁻¹``; the first :meth:`step` then skips its ``A`` update. Typical use,
        once before the training loop: ``opt.warm_start(train_loader)``.

        Args:
            batches: any iterable of batches, e.g. the training ``DataLoader`` (one epoch).
            forward: ``forward(batch)`` runs the model on one batch; default: ``model(x)`` with
                ``x = batch[0]`` for tuples / lists (``(inputs, targets)``), else ``batch``,
                moved to the device of the model's first supported layer.
            max_batches: stop after this many batches (default: the whole iterable).

        Runs without gradients, in the model's current train / eval mode; BatchNorm running
        statistics are left as they were (the pass measures ``A``, it does not train). Returns
        the number of batches used (this rank's). Distributed: ``A`` is averaged over all
        ranks' batches.
        """
        check(max_batches is None or (isinstance(max_batches, int) and max_batches >= 1),
              "max_batches", max_batches, "None or an integer >= 1")
        if self.kron_group is None:
            return 0
        model = self.model
        device = self.layers[0].weight.device

        def default_forward(b: Any) -> Any:
            x = b[0] if isinstance(b, (tuple, list)) else b
            return model(x.to(device) if isinstance(x, Tensor) else x)

        fwd = forward or default_forward
        sums = []
        for module in self.layers:
            d_in = matrix_shape(module)[1]
            sums.append(torch.zeros(d_in, d_in, dtype=self.factor_dtype, device=self._device))
        n = 0
        with self.capture.warm(), self._batchnorm_frozen():
            for batch in batches:
                if max_batches is not None and n >= max_batches:
                    break
                self.capture.start(lambda m, rec: [input_statistics(m, rec.x)[0]],
                                   inputs=True, grads=False)
                fwd(batch)
                recs = self.capture.collect()
                for name, acc in zip(self.layer_names, sums):
                    if recs[name] is not None:
                        acc.add_(recs[name][0])
                n += 1
        total: Tensor | int = n
        if self.distributed:  # sum over ranks of the batch statistics and of the batch counts
            *sums, total = self._all_reduce(sums + [sums[0].new_tensor(float(n))])
        if int(total) == 0:
            raise ValueError("warm_start got no batches")
        for i, (own, ls, acc) in enumerate(zip(self._owned, self._st["layers"], sums)):
            if not self._works(own):
                continue
            lam_a = math.sqrt(self.layer_group(i)["damping"])
            ls["A"].copy_(acc / total)
            ls["H_a"].copy_(damped_inverse(ls["A"], lam_a))
        self._st["a_initialized"] = True
        self._st["warm_started"] = True
        return n

    # ------------------------------------------------------------------ step
    @staticmethod
    def _pass1_stats(module: nn.Module, rec: Any) -> list[Tensor]:
        """``mean ā āᵀ``, ``mean ā``, ``h̄`` and ``mean_B(g)`` (g: per-example spatial sums)."""
        return [*input_statistics(module, rec.x), rec.h_mean, rec.g.sum(dim=(0, 1))]

    @staticmethod
    def _pass2_stats(module: nn.Module, rec: Any) -> list[Tensor]:
        return [rec.h_mean, rec.g.sum(dim=(0, 1))]

    def _collected(self, recs: dict[str, Any]) -> list[list[Tensor] | None]:
        """Per layer the pass statistics with ``ḡ`` times the number of micro-batches ``k``
        (each micro-batch loss is divided by ``k``), or ``None`` without data."""
        out = []
        for name in self.layer_names:
            rec, k = recs[name], self.capture.last_calls[name]
            if rec is not None and k > 1:
                rec = [*rec[:-1], rec[-1] * k]
            out.append(rec)
        return out

    @curvature_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One K-BFGS step; ``closure`` is required (see the class docstring)."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure: K-BFGS evaluates the same "
                "minibatch twice per step. Call opt.step(closure) where closure() zeroes grads, "
                "computes the loss on the current batch, calls backward() and returns the loss "
                "(with Hugging Face's Trainer: secant.integrations.huggingface.SecantTrainer).")
        st = self._st
        k = st["step"] + 1
        kron = self.kron_group is not None
        curvature = kron and (k - 1) % self.curvature_update_period == 0
        if curvature:
            self.capture.start(self._pass1_stats, h_mean=True)
        rng = _rng_state()
        try:
            with torch.enable_grad():
                loss = closure()
            recs1 = self._collected(self.capture.collect()) if curvature else None
        finally:
            self.capture.stop()
        if kron:
            pass1 = self._first_half(recs1, skip_a=(k == 1 and st["warm_started"]))
        self._fallback_step("ema")
        if curvature:
            self.capture.start(self._pass2_stats, inputs=False, h_mean=True, carry=True)
            _set_rng_state(rng)  # the same dropout masks (and other randomness) as pass 1
            try:
                with torch.enable_grad(), self._batchnorm_frozen(), self._preactivation_pass():
                    closure()
                recs2 = self._collected(self.capture.collect())
            finally:
                self.capture.stop()
            self._second_half(pass1, recs2)
        st["step"] = k
        return loss.detach() if isinstance(loss, Tensor) else loss

    @contextmanager
    def _preactivation_pass(self) -> Iterator[None]:
        """Pass 2 without parameter gradients (docs/kronecker.md, "The second pass").

        Pass 2 needs only the batch means of the pre-activations and of their gradients. While
        it runs, this optimizer's parameters do not require grad (so ``backward()`` computes no
        weight gradient: about a third of a forward/backward's work), and the capture (started
        with ``carry``) gives a supported layer whose output would not require grad (no
        trainable input upstream) an output that does, so the graph still carries every
        pre-activation gradient. The pass-1 gradients are set aside (so the closure's
        ``zero_grad`` cannot clear them) and put back afterwards, with the flags, whatever
        happens. A ``DistributedDataParallel`` model runs the pass under
        ``no_sync()`` (its gradient hooks would never fire).
        """
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [(p.grad, p.requires_grad) for p in params]
        sync = (self.model.no_sync() if isinstance(self.model, DistributedDataParallel)
                else nullcontext())
        try:
            for p in params:
                p.grad = None
                p.requires_grad_(False)
            with sync:
                yield
        finally:
            for p, (grad, req) in zip(params, saved):
                p.requires_grad_(req)
                p.grad = grad

    def _stats_or_nan(self, recs: list[list[Tensor] | None], shapes: list[list[tuple]]
                      ) -> list[Tensor]:
        """Flat list of the layers' statistics; NaN (rejected) for a layer without data."""
        out: list[Tensor] = []
        for rec, shp in zip(recs, shapes):
            out.extend(rec if rec is not None else
                       [torch.full(s, math.nan, dtype=self.factor_dtype, device=self._device)
                        for s in shp])
        return out

    def _flags(self, flags: list[bool]) -> Tensor | None:
        """``flags`` as a bool tensor, or ``None`` when all are true (the usual step: no
        masking at all)."""
        return None if all(flags) else torch.tensor(flags, device=self._device)

    def _first_half(self, recs: list[list[Tensor] | None] | None, skip_a: bool
                    ) -> list[tuple | None]:
        """Steps 2–3 for every layer (``A``, gradient EMA, direction); returns per stack what
        the second half needs (:meth:`_first_half_stack`). ``recs`` is ``None`` on a step
        between curvature updates: gradient EMA and direction only, with the last ``H_g`` and
        ``H_a``."""
        stats = None
        if recs is not None:
            shapes = [[(i, i), (i,), (o,), (o,)] for o, i in map(matrix_shape, self.layers)]
            stats = self._all_reduce(self._stats_or_nan(recs, shapes),
                                     average=True)  # global-batch statistics
        shared = self.distributed and self.distributed_mode == "memory"
        targets: dict[int, list[Tensor]] = {}
        whole: dict[int, list[tuple[Tensor | None, Tensor | None]]] = {}
        bufs: list[Tensor] = []  # directions added to the parameters after the stacks
        buffered: list[int] = []
        for i, module in enumerate(self.layers):
            if not self._has_grad(i):  # no gradient: no update at all
                continue
            params = layer_params(module)
            # the step goes straight into the parameters (as matrices), or into buffers added
            # afterwards: shared over the ranks, or a dtype / layout GEMMs cannot write to
            if not shared and not self.sharded and all(
                    p.dtype == self.factor_dtype and p.is_contiguous() for p in params):
                targets[i] = [_matrix(module, p) for p in params]  # (under no_grad)
            else:
                targets[i] = [torch.zeros(_matrix(module, p).shape, dtype=self.factor_dtype,
                                          device=self._device) for p in params]
                bufs.extend(targets[i])
                buffered.append(i)
            # FSDP2: every rank gathers every layer's tensors (collectives in one order)
            whole[i] = [_whole(p, wd) for p, wd in zip(params, self._layer_weight_decay(i))]
        saved = [self._first_half_stack(stack, stats, recs, targets, whole, skip_a)
                 for stack in self._stacks]
        if shared:
            bufs = self._all_reduce(bufs)  # owners' steps, zeros elsewhere: summed = shared
        parts = iter(bufs)
        with torch.no_grad():
            for i in buffered:
                module = self.layers[i]
                for p, d in zip(layer_params(module), parts):
                    local(p).add_(local_rows(p, weight_layout(module, d) if p.dim() > 1
                                             else d))
        self._st["a_initialized"] = True
        return saved

    def _first_half_stack(self, stack: LayerStack, stats: list[Tensor] | None,
                          recs: list[list[Tensor] | None] | None,
                          targets: dict[int, list[Tensor]],
                          whole: dict[int, list[tuple[Tensor | None, Tensor | None]]],
                          skip_a: bool) -> tuple | None:
        """Steps 2–3 for the layers of one stack: the pass-1 statistics padded into the stack
        (``A``'s EMA, their finiteness, one flag per layer, in batched ops), then per layer the
        gradient EMA and the direction ``−η H_g ĝ H_a`` into ``targets``. Returns what the
        second half needs, ``(h̄, ḡ, v, ok, hg, live)`` (``ok [L]``: the layer's pass-1 set
        ``(A, v, h̄, ḡ)`` is finite — a non-finite set updates nothing: neither ``A``, ``H_a``
        nor, through ``h̄`` and ``ḡ``, the pair; ``live``: the layers that stepped with pass-1
        data), or
        ``None`` when no layer of the stack has a gradient or there are no statistics."""
        live = [i in whole for i in stack.index]
        if not any(live):
            return None
        t = stack.tensors
        group = self.layer_group(stack.index[0])
        saved = None
        if stats is not None:
            o, i_ = t["s_bar"].shape[1], t["A"].shape[1]
            a_new, v, h_mean, g_sum = stack.pack(
                [stats[4 * i: 4 * i + 4] for i in stack.index], [(i_, i_), (i_,), (o,), (o,)])
            # a Gram matrix is finite iff its diagonal is (|A_ij| ≤ sqrt(A_ii A_jj))
            ok = rows_finite(a_new.diagonal(dim1=1, dim2=2), v, h_mean, g_sum)
            with_data = [lv and recs[i] is not None for lv, i in zip(live, stack.index)]
            counted = self._flags(with_data)
            t["stats_rejected"] += _masked(~ok, counted)
            ok = _masked(ok, self._flags(live))
            self._update_a(stack, a_new, ok, group["damping"], skip_a)
            saved = [h_mean, g_sum, v, ok, with_data]
        self._update_grad_ema(stack, whole, 1.0 - group["momentum"])
        hg = self._hg_matrix(stack)
        hx = _compact_hg(t, t["grad_ema"]) if hg is None else None
        for j, (i, ls, views) in enumerate(zip(stack.index, self._layer_states(stack),
                                               self._views(stack))):
            if not live[j]:
                continue
            if hx is not None:  # H_g X of the whole stack, computed above
                o, n = ls["grad_ema"].shape
                hg_x = hx[j, :o, :n]
                hg_x = [hg_x[:, :-1], hg_x[:, -1]] if len(views["x"]) == 2 else [hg_x]
            else:
                o = ls["grad_ema"].shape[0]
                h = ls["H_g"] if "H_g" in ls else hg[j, :o, :o]
                hg_x = [h @ blk for blk in views["x"]]
            self._add_direction(views, hg_x, targets[i], -group["lr"])
        if saved is None:
            return None
        saved.insert(4, hg)
        return tuple(saved)

    def _layer_states(self, stack: LayerStack) -> list[dict[str, Tensor]]:
        layers = self._st["layers"]
        return [layers[i] for i in stack.index]

    def _update_a(self, stack: LayerStack, a_new: Tensor, ok: Tensor, damping: float,
                  skip_a: bool) -> None:
        """Step 2's ``A`` where the statistics are finite (``ok [L]``): on the first step
        ``A`` is the statistic (``a_init``) and ``H_a = (A + √λ I)⁻¹`` (layer by layer), later
        the EMA (skipped on the first step after :meth:`warm_start`)."""
        if not self._st["a_initialized"]:
            if self.a_init == "zero":  # a zero-started average after one update
                a_new = a_new * (1.0 - self.stat_decay)
            for j, ls in enumerate(self._layer_states(stack)):
                a = ls["A"]
                n = a.shape[0]
                a.copy_(torch.where(ok[j], a_new[j, :n, :n], a))
                inverse = damped_inverse(a, math.sqrt(damping))
                ls["H_a"].copy_(torch.where(ok[j], inverse, ls["H_a"]))
        elif not skip_a:
            a = stack.tensors["A"]  # (not in place into a_new: v may be a view of it)
            a.lerp_(torch.where(ok.view(-1, 1, 1), a_new, a), 1.0 - self.stat_decay)

    def _views(self, stack: LayerStack) -> list[dict[str, Any]]:
        """Per layer of ``stack``, views of its state that every step reads, built once: the
        gradient EMA's column blocks ``x = [X_W, x_b]`` (``[X]`` without a bias) and the blocks
        of ``H_a = [[H, h], [h′ᵀ, η]]`` (``h_a`` itself without a bias)."""
        if "views" not in stack.derived:
            out = []
            for i, ls in zip(stack.index, self._layer_states(stack)):
                x, h_a = ls["grad_ema"], ls["H_a"]
                if self.layers[i].bias is None:
                    out.append({"x": [x], "h_a": h_a})
                else:
                    out.append({"x": [x[:, :-1], x[:, -1]], "h": h_a[:-1, :-1],
                                "h_row": h_a[-1, :-1], "h_col": h_a[:-1, -1],
                                "eta": h_a[-1, -1]})
            stack.derived["views"] = out
        return stack.derived["views"]

    def _update_grad_ema(self, stack: LayerStack,
                         whole: dict[int, list[tuple[Tensor | None, Tensor | None]]],
                         rate: float) -> None:
        """``ĝ ← ĝ + rate·(∇W̃ + wd·W̃ − ĝ)`` for the stack's layers with a gradient, column
        block by column block (``[∇W, ∇b]`` with each block's own group weight decay; a missing
        gradient counts as zero), in place and in a few ``foreach`` ops for the whole stack:
        ``lerp`` towards the gradient, then ``+ rate·wd·W̃`` — the same update as a ``lerp``
        towards ``∇W̃ + wd·W̃`` up to rounding, without building ``[∇W, ∇b]``. ``whole[i]``:
        ``(gradient, parameter)`` of each of layer ``i``'s parameters, whole (FSDP2: gathered,
        see :func:`_whole`); the parameter is ``None`` where no decay is added."""
        lerp, grads, missing = [], [], []
        decay: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        for i, views in zip(stack.index, self._views(stack)):
            if i not in whole:
                continue
            m = self.layers[i]
            for (grad, p), blk, wd in zip(whole[i], views["x"], self._layer_weight_decay(i)):
                if grad is None:
                    missing.append(blk)
                else:  # (.to is a no-op, no copy, when the dtypes match)
                    lerp.append(blk)
                    grads.append(_matrix(m, grad).to(blk.dtype))
                if p is not None:
                    blocks, params = decay.setdefault(wd, ([], []))
                    blocks.append(blk)
                    params.append(_matrix(m, p))
        if lerp:
            torch._foreach_lerp_(lerp, grads, rate)
        if missing:
            torch._foreach_mul_(missing, 1.0 - rate)
        for wd, (blocks, params) in decay.items():
            torch._foreach_add_(blocks, params, alpha=rate * wd)

    def _second_half(self, pass1: list[tuple | None], recs: list[list[Tensor] | None]) -> None:
        """Steps 4–6 for every stack, in batched ops: the pairs and their EMAs, double damping,
        the cautious tests, the ``H_g`` update and the Hessian-action update of ``H_a``."""
        shapes = [[(o,), (o,)] for o, _ in map(matrix_shape, self.layers)]
        stats = self._all_reduce(self._stats_or_nan(recs, shapes), average=True)
        for j, (stack, saved) in enumerate(zip(self._stacks, pass1)):
            if saved is None:
                continue
            h1, g1, v, ok, hg, live = saved
            live = [lv and recs[i] is not None for lv, i in zip(live, stack.index)]
            if not any(live):
                continue
            o = stack.tensors["s_bar"].shape[1]
            h2, g2 = stack.pack([stats[2 * i: 2 * i + 2] for i in stack.index], [(o,), (o,)])
            alive = self._flags(live)
            root = math.sqrt(self.layer_group(stack.index[0])["damping"])
            update = self._compiled(("pairs", j), _pair_updates)  # one graph per stack
            update(stack.tensors, h1, g1, v, ok, h2, g2, hg, alive, self.pair_decay, self.mu1,
                   root, self.cautious_eps)

    # ------------------------------------------------------------------ reporting
    def diagnostics(self) -> dict[str, Any]:
        """Per-layer counters (synchronises with the device): G pairs accepted / rejected
        (cautious skip or non-finite), H_a Hessian-action updates accepted / rejected, double-
        damping activations of step 1 (Powell on H) and step 2 (Powell with B = I), non-finite
        input statistics rejected; totals alongside. Distributed (memory mode): counters of the
        layers this rank owns (0 for the others; ``layer_owners`` lists the owners)."""
        st = self._st
        out: dict[str, Any] = {"step": st["step"], "layers": self.layer_names,
                               "warm_started": st["warm_started"]}
        if self.distributed:
            out["layer_owners"] = list(self.layer_owners)
        for key in ("g_pairs_accepted", "g_pairs_rejected", "a_updates_accepted",
                    "a_updates_rejected", "dd_step1_active", "dd_step2_active",
                    "stats_rejected"):
            per = [int(ls[key]) if key in ls else 0 for ls in st["layers"]]
            out[key + "_per_layer"] = per
            out[key] = sum(per)
        out["pairs_accepted"] = out["g_pairs_accepted"]
        out["pairs_rejected"] = out["g_pairs_rejected"]
        return out


class KBFGS(_KroneckerBFGS):
    r"""K-BFGS: ``H_g`` is a dense ``d_out × d_out`` BFGS matrix, started at ``I`` and updated
    by :func:`secant.linalg.bfgs_inverse_update_` with each accepted double-damped pair.

    Use: ``opt = KBFGS(model, lr=0.1, damping=0.3)``; optionally ``opt.warm_start(train_loader)``
    once before training (the paper's setting with minibatches); then each iteration
    ``loss = opt.step(closure)``, where ``closure`` zeroes grads, computes the loss on the
    current minibatch, calls ``backward()`` and returns the loss — it is called twice per step
    on the same minibatch. Recommended start: ``lr`` 0.1 (0.03 to 1; the paper's 0.3 diverged
    on one harness problem, ``benchmarks/tuning.md``), ``damping`` 0.3; ``pair_decay=0`` and
    ``a_init="zero"`` for full-batch training.
    Not supported: ``step()`` without a closure (``RuntimeError``), a closure that draws fresh
    data between its two calls (silently wrong pairs; dropout is fine: both calls draw the same
    masks), frozen biases (``ValueError``; exclude them), a layer called twice in one
    forward (``RuntimeError``); unsupported modules (norms, embeddings, grouped convs) get the
    K-BFGS step with identity preconditioner.

    The algorithm (shared with :class:`KBFGSL`) follows below.

    Args (defaults: the paper's official code and its MNIST Demo):
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
        param_groups: per-parameter / per-module options (``lr``, ``damping``, ``momentum``,
            ``weight_decay``), see :mod:`secant.optim.layer_optimizer`.
        factor_dtype: dtype of the curvature state (default: float32 for bf16 / fp16 layers,
            else the parameters' dtype).
        grad_scaler: must be ``None`` (see above).
        process_group: the ranks that share curvature work (default: the default group when
            ``torch.distributed`` is initialised with more than one rank, else none).
        distributed_mode: ``"memory"`` (default) or ``"communication"`` (see below).
        a_init: ``"statistic"`` (default) or ``"zero"``: how ``A`` starts without
            :meth:`warm_start` (see step 2 below).
        curvature_update_period: ``T`` (1, the paper): steps 1, 1 + T, 1 + 2T, ... are full
            steps; the ``T − 1`` steps in between call the closure once and only update the
            gradient EMA and step with the last ``H_g`` and ``H_a`` (an extension beyond the
            paper, opt-in; measured in ``benchmarks/kbfgs_period.md``: T = 5 helped K-BFGS on
            the CURVES autoencoder, while K-BFGS(L) with T = 5 or 10 diverged on every seed).
        compile: ``True`` (inductor) or a ``torch.compile`` backend name: steps 4–6 of each
            layer stack (pair averages, double damping, cautious tests, ``H_g`` and ``H_a``
            updates, counters) run as one compiled graph per stack, built in the first step
            (seconds on a CPU) and never rebuilt across steps or learning rates (a change of
            ``damping`` rebuilds it); equal to eager up to rounding (``False``, the default).
            The capture, statistics and directions stay eager.
    """

    __doc__ = (__doc__ or "") + "\n" + (_KroneckerBFGS.__doc__ or "")

    def __init__(self, model: nn.Module, lr: float = 0.3, damping: float = 0.3,
                 momentum: float = 0.9, weight_decay: float = 1e-5, stat_decay: float = 0.9,
                 pair_decay: float = 0.9, mu1: float = 0.2, cautious_eps: float = 1e-4, *,
                 exclude: Iterable[nn.Module] = (), fallback_lr: float | None = None,
                 param_groups: list[dict[str, Any]] | None = None,
                 factor_dtype: torch.dtype | None = None, grad_scaler: Any = None,
                 process_group: Any = None, distributed_mode: str = "memory",
                 a_init: str = "statistic", curvature_update_period: int = 1,
                 compile: bool | str = False) -> None:  # noqa: A002
        super().__init__(model, lr, damping, momentum, weight_decay, stat_decay, pair_decay,
                         mu1, cautious_eps, exclude, fallback_lr, process_group,
                         distributed_mode, a_init, curvature_update_period, compile,
                         param_groups=param_groups, factor_dtype=factor_dtype,
                         grad_scaler=grad_scaler)

    def _fresh_hg(self, d_out: int, kw: dict[str, Any]) -> dict[str, Tensor]:
        return {"H_g": torch.eye(d_out, **kw)}

    def _hg_matrix(self, stack: LayerStack) -> Tensor:
        return stack.tensors["H_g"]


class KBFGSL(_KroneckerBFGS):
    r"""K-BFGS(L): as :class:`KBFGS` with less memory. Use:
    ``opt = KBFGSL(model, lr=0.1, damping=0.3, dense_hg=True)`` (see below), optional
    ``opt.warm_start(train_loader)``, then ``loss = opt.step(closure)`` (closure called twice per
    step on the same minibatch); same recommended start and same "not supported" list as
    :class:`KBFGS`.

    ``H_g`` is the L-BFGS operator of the last ``history_size`` accepted pairs with
    ``H₀ = I`` (γ fixed to 1, as the paper), kept in the shared ring-buffer history of
    :mod:`secant.linalg.lbfgs` (one block, ``c = d_out``). A step multiplies by it twice (the
    direction, then ``H_g ȳ`` in the double damping). Where ``d_out ≤ 2·history_size`` the step
    first materialises ``H_g`` as a dense ``d_out × d_out`` matrix (the compact form multiplied
    out, :func:`secant.linalg.lbfgs.dense_inverse`: one ``m × m`` triangular solve) and both
    products are plain matmuls; wider layers apply the compact form
    (:func:`secant.linalg.compact_apply`, two solves each) to the direction and to ``ȳ``.
    Either way the operator is L-BFGS of the ring's pairs, not a full-memory BFGS matrix (the
    two differ once the ring wraps). The transient dense matrix is no larger than the history's
    ``2·history_size × d_out`` vectors; the state kept between steps is the history alone:
    ``2·history_size·(d_out + 2·history_size)`` per layer instead of ``d_out²``.

    **The sliding window can blow up** (``dense_hg=True`` avoids it where ``d_out ≤ 2m``).
    Double damping makes each pair safe for the operator it was damped against: step 1 keeps
    ``ρ ȳᵀH ȳ ≤ 1/μ1`` (``ρ = 1/s̃ᵀỹ``), which bounds how much the update
    ``H⁺ = VᵀHV + ρ s̃s̃ᵀ``, ``V = I − ρ ỹs̃ᵀ``, can amplify ``H``. Once the ring wraps, the
    operator rebuilt from the last ``m`` pairs starts from ``H₀ = I`` instead of the older
    pairs each stored pair was damped against, so the bound no longer holds for the oldest ones:
    on a small ViT the patch embedding's ``H_g`` grew a largest eigenvalue of 170–600 (full BFGS
    31–42) and the run fell to chance ~70 steps after the wrap (``benchmarks/kbfgsl_window.md``).
    With ``dense_hg=True`` every layer with ``d_out ≤ 2·history_size`` keeps K-BFGS's full-memory
    dense ``H_g`` (BFGS of every accepted pair, at most as large as that layer's history would
    be, and one rank-2 update per step instead of a rebuild): the same iterates as the paper's
    until the ring would wrap, K-BFGS's afterwards. Wider layers keep the ring.

    Args: as :class:`KBFGS` (including ``process_group``, ``distributed_mode``, ``a_init``,
    ``compile``), plus
    ``history_size`` (100, the paper's code) and ``dense_hg`` (``False``: the paper's L-BFGS
    ``H_g`` in every layer; ``True``: the dense ``H_g`` above where ``d_out ≤ 2·history_size``).
    """

    __doc__ = (__doc__ or "") + "\n" + (_KroneckerBFGS.__doc__ or "")

    def __init__(self, model: nn.Module, lr: float = 0.3, damping: float = 0.3,
                 history_size: int = 100, momentum: float = 0.9, weight_decay: float = 1e-5,
                 stat_decay: float = 0.9, pair_decay: float = 0.9, mu1: float = 0.2,
                 cautious_eps: float = 1e-4, *, exclude: Iterable[nn.Module] = (),
                 fallback_lr: float | None = None,
                 param_groups: list[dict[str, Any]] | None = None,
                 factor_dtype: torch.dtype | None = None, grad_scaler: Any = None,
                 process_group: Any = None, distributed_mode: str = "memory",
                 a_init: str = "statistic", curvature_update_period: int = 1,
                 dense_hg: bool = False, compile: bool | str = False) -> None:  # noqa: A002
        check(isinstance(history_size, int) and not isinstance(history_size, bool)
              and history_size >= 1, "history_size", history_size, "an integer >= 1")
        check(isinstance(dense_hg, bool), "dense_hg", dense_hg, "True or False")
        self.history_size = history_size
        self.dense_hg = dense_hg
        super().__init__(model, lr, damping, momentum, weight_decay, stat_decay, pair_decay,
                         mu1, cautious_eps, exclude, fallback_lr, process_group,
                         distributed_mode, a_init, curvature_update_period, compile,
                         param_groups=param_groups, factor_dtype=factor_dtype,
                         grad_scaler=grad_scaler)

    def _fresh_hg(self, d_out: int, kw: dict[str, Any]) -> dict[str, Tensor]:
        m = self.history_size
        if self.dense_hg and d_out <= 2 * m:
            return KBFGS._fresh_hg(self, d_out, kw)
        dev = kw["device"]
        return {
            "hist_z": torch.zeros(1, 2 * m, d_out, **kw),
            "hist_gram": torch.zeros(1, 2 * m, 2 * m, **kw),
            "hist_head": torch.zeros(1, dtype=torch.long, device=dev),
            "hist_count": torch.zeros(1, dtype=torch.long, device=dev),
        }

    def _stack_kind(self, ls: dict[str, Tensor]) -> Hashable:
        """Layers of a ring wider than ``2·history_size`` apply it in compact form."""
        return "hist_z" in ls and ls["hist_z"].shape[2] > 2 * self.history_size

    def _hg_matrix(self, stack: LayerStack) -> Tensor | None:
        """The L-BFGS matrices ``H_g`` (:func:`secant.linalg.lbfgs.dense_inverse`) of a stack
        of layers with ``d_out ≤ 2·history_size``; ``None`` (compact applies) above. The
        layers' own matrices where they keep dense ones (``dense_hg``)."""
        t = stack.tensors
        if "H_g" in t:
            return t["H_g"]
        if self._stack_kind(self._layer_states(stack)[0]):
            return None
        return dense_inverse(_history(t), t["hist_z"].new_ones(len(stack)))

    def diagnostics(self) -> dict[str, Any]:
        """As :meth:`KBFGS.diagnostics`, plus ``history_length`` per layer (``None`` for a layer
        that keeps a dense ``H_g``) and ``dense_hg_layers``, the names of those layers."""
        out = super().diagnostics()
        layers = self._st["layers"]
        out["history_length"] = [None if "H_g" in ls else int(ls["hist_count"])
                                 if "hist_count" in ls else 0 for ls in layers]
        out["dense_hg_layers"] = [n for n, ls in zip(self.layer_names, layers) if "H_g" in ls]
        return out
