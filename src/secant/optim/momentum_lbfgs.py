"""mL-BFGS: momentum-based block-wise L-BFGS (Niu, Fabian, Lee, Soltanolkotabi & Avestimehr,
TMLR 2023, arXiv 2307.13744)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from secant.distributed import all_gather_rows, assign_blocks, check_consistent, resolve_group
from secant.linalg import (
    History,
    block_dot,
    compact_apply,
    newest_gamma,
    newest_pair,
    push,
    tau_coefficient,
)
from secant.optim.block_layout import BlockLayout
from secant.optim.validation import check

STEP_RULES = ("grad_norm", "unit", "kl_clip", "none")
_STATE = "mlbfgs"


class MomentumLBFGS(Optimizer):
    r"""Momentum-based block-wise L-BFGS (mL-BFGS).

    Every step keeps exponential moving averages of the parameters and of the gradients of
    each block :math:`b` (normalised EMAs, initialised with the first values)::

        Mθ_b ← β Mθ_b + (1 − β) θ_b        Mg_b ← β Mg_b + (1 − β) g_b

    Every ``update_period`` (T) steps, from step 2T on, a curvature pair is formed from the
    differences of the averages since the previous snapshot, ``s = Mθ − Pθ``, ``y = Mg − Pg``
    (on a quadratic ``y = A s`` holds exactly: the averages are exact secants), damped by the
    τ-rule so that ``sᵀŷ / sᵀs ∈ [σ_L, σ_H]`` (paper §3, ALGORITHMS.md §2.3), and pushed into the
    block's ring of ``history_size`` (m) pairs. A pair with any non-finite entry is rejected.

    The direction is the L-BFGS product of the block-diagonal inverse-Hessian approximation with
    the weight-decayed gradient, ``d_b = H_b (g_b + λ θ_b)`` with ``H₀ = γ I`` and
    ``γ = sᵀŷ / ŷᵀŷ`` of the newest pair, applied to all blocks at once in the compact form
    (:func:`secant.linalg.compact_apply`). It then goes through the ``step_rule`` and heavy-ball
    momentum: ``u ← μ u + d``, ``θ ← θ − η u``. Before the first pair exists (steps 1..2T−1) the
    update is exactly :class:`torch.optim.SGD` with the same momentum and weight decay.

    Args:
        params: parameters or parameter groups (``lr``, ``momentum`` and ``weight_decay`` may be
            set per group).
        lr: learning rate η (paper runs: 0.1 with cosine decay).
        momentum: heavy-ball momentum μ on the quasi-Newton direction (paper: 0.9).
        weight_decay: L2 coefficient λ, added to the gradient before preconditioning.
        history_size: pairs kept per block, m (paper runs: 10).
        update_period: steps between curvature pairs, T (paper runs: 50).
        beta: EMA factor β of parameters and gradients (paper runs: 0.999). The averages lag by
            about ``1/(1−β)`` steps. A shorter horizon (β = 0.9, T = 20) was faster on the
            harness's noisy quadratic but slower than SGD with momentum on its digits
            autoencoder, where it also diverged at a learning rate SGD trained at
            (``benchmarks/mlbfgs_defaults.md``); the paper's 0.999 with T = 50 was never slower
            than SGD with momentum there.
        damping: τ₀ = 1 − damping caps the mixing weight, so at least ``damping`` of ``s`` is
            always mixed into ``ŷ`` (paper runs: 0.01).
        sigma_low, sigma_high: bounds σ_L < 1 < σ_H of the damped curvature ratio (0.01, 1.5).
        blocks: ``"group"`` (default: one block per parameter group), ``"tensor"`` (one block
            per parameter tensor) or a list of lists of parameters that partitions all
            parameters, each block inside one group. The Hessian approximation is
            block-diagonal over these blocks. Default ``"group"`` by measurement
            (``benchmarks/mlbfgs_defaults.md``): with one block per tensor every small tensor
            (a bias) gets its own noisy pairs and its own ``γ``, the per-block scalings spread
            over orders of magnitude and most of the step goes into one tensor; on the
            harness's digits autoencoder the per-tensor form never reached the target and
            diverged at LRs where SGD with momentum trained, while one block per group reached
            it sooner than SGD with momentum. ``"tensor"`` (the finer split that lets
            distributed training spread blocks over ranks) stays available.
        step_rule: what is done with the quasi-Newton direction ``d`` before momentum, once the
            history is in use (from step 2T):

            * ``"grad_norm"`` (default) — rescale ``d`` to the global norm of the
              weight-decayed gradient: curvature sets the direction, ``lr`` keeps its SGD meaning
              and the step length is continuous with the warm-up. The most robust rule across
              learning rates in ``benchmarks/mlbfgs_step_rule.md``.
            * ``"unit"`` — divide ``d`` by its global norm (the released code's ``slimblock.py``):
              ``lr`` is then a step length. Fastest of all on the harness quadratic, slower
              than SGD with momentum on the digits autoencoder.
            * ``"kl_clip"`` — ``d ← ν d``, ``ν = min(1, sqrt(κ / (η² gᵀd)))`` (``slim.py``; Ba et
              al. 2017), κ = ``kl_clip``.
            * ``"none"`` — use ``d`` as is (the clean paper form).
        kl_clip: κ for ``step_rule="kl_clip"``.
        ema_normalized: ``False`` uses the released code's un-normalised EMA ``M ← β M + x``.
        grad_ema_reset: ``True`` resets the gradient EMA to the current gradient right after each
            curvature pair (released code, "refresh-g").
        pair_momentum: double momentum on pairs (released code ``--mmm``, 0.9 in its runs):
            ``s ← (1−a) s + a s_prev``, ``y ← (1−a) y + a ŷ_prev`` before damping, with the
            newest stored pair. 0 disables it (clean form).
        chunk_size: entries per chunk of the flat history layout (a performance knob).
        process_group: the ranks that share curvature work. Default: the default group when
            ``torch.distributed`` is initialised with more than one rank, else none. Blocks are
            assigned to ranks balanced by size (:func:`secant.distributed.assign_blocks`); each
            rank keeps averages, snapshots and history only for its own blocks and computes
            their directions, which are all-gathered so every replica applies the same update
            (gradients must already be averaged, e.g. by DDP). Curvature memory per rank is
            about 1/world of the single-process figure; a rank may own no block. Checkpoints
            are per rank: each rank saves and loads its own ``state_dict`` (same world size).

    Parameters whose ``.grad`` is ``None`` are not updated in that step (their gradient counts
    as zero in the averages). A step whose gradients are not all finite is skipped entirely and
    counted in :meth:`diagnostics`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        history_size: int = 10,
        update_period: int = 50,
        beta: float = 0.999,
        damping: float = 0.01,
        sigma_low: float = 0.01,
        sigma_high: float = 1.5,
        *,
        blocks: str | Sequence[Sequence[Tensor]] = "group",
        step_rule: str = "grad_norm",
        kl_clip: float = 1e-3,
        ema_normalized: bool = True,
        grad_ema_reset: bool = False,
        pair_momentum: float = 0.0,
        chunk_size: int = 4096,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        check(isinstance(history_size, int) and history_size >= 1, "history_size",
               history_size, "an integer >= 1")
        check(isinstance(update_period, int) and update_period >= 1, "update_period",
               update_period, "an integer >= 1")
        check(0.0 <= beta < 1.0, "beta", beta, "a value in [0, 1)")
        check(0.0 <= damping < 1.0, "damping", damping, "a value in [0, 1)")
        check(0.0 <= sigma_low < 1.0, "sigma_low", sigma_low, "a value in [0, 1)")
        check(sigma_high > 1.0 and math.isfinite(sigma_high), "sigma_high", sigma_high,
               "a finite value > 1")
        check(step_rule in STEP_RULES, "step_rule", step_rule, f"one of {STEP_RULES}")
        check(kl_clip > 0.0, "kl_clip", kl_clip, "a value > 0")
        check(0.0 <= pair_momentum < 1.0, "pair_momentum", pair_momentum, "a value in [0, 1)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            check(group["lr"] >= 0.0, "lr", group["lr"], "a value >= 0")
            check(0.0 <= group["momentum"] < 1.0, "momentum", group["momentum"],
                   "a value in [0, 1)")
            check(group["weight_decay"] >= 0.0, "weight_decay", group["weight_decay"],
                   "a value >= 0")
            for p in group["params"]:
                if p.is_sparse or p.is_complex() or not p.is_floating_point():
                    raise ValueError("MomentumLBFGS supports dense real floating-point "
                                     "parameters only")
        kinds = {(p.dtype, p.device) for g in self.param_groups for p in g["params"]}
        if len(kinds) > 1:
            raise ValueError(f"MomentumLBFGS keeps one flat buffer per state: all parameters "
                             f"must share one dtype and device, got {sorted(map(str, kinds))}")
        self.history_size = history_size
        self.update_period = update_period
        self.beta = beta
        self.tau_max = 1.0 - damping
        self.sigma_low = sigma_low
        self.sigma_high = sigma_high
        self.step_rule = step_rule
        self.kl_clip = kl_clip
        self.ema_normalized = ema_normalized
        self.grad_ema_reset = grad_ema_reset
        self.pair_momentum = pair_momentum
        resolved = self._resolve_blocks(blocks)
        self._block_group = self._group_of_blocks(resolved)
        self._group, self._rank, self._world = resolve_group(process_group)
        sizes = [sum(p.numel() for p in b) for b in resolved]
        shards = assign_blocks(sizes, self._world) if self._group else None
        lay = self._layout = BlockLayout(resolved, chunk_size, shards)
        if self._group is not None:
            setup = (f"{[tuple(p.shape) for p in lay.params]} {sizes} m={history_size} "
                     f"T={update_period} c={lay.chunk_size} {lay.dtype}")
            check_consistent(setup, self._group, lay.chunk_block.device,
                             "the parameters, blocks or MomentumLBFGS settings")
        # This rank's curvature state: its own blocks' chunks only.
        self._own = lay.shard_chunks(self._rank)
        own_blocks = lay.shards[self._rank]
        local = {b: i for i, b in enumerate(own_blocks)}
        self._own_chunk_block = torch.tensor(
            [local[int(b)] for b in lay.chunk_block[self._own]], dtype=torch.long,
            device=lay.chunk_block.device)
        self._own_params = [p for b in own_blocks for p in resolved[b]]
        self._chunk_group = torch.tensor(self._block_group, dtype=torch.long,
                                         device=lay.chunk_block.device)[lay.chunk_block]
        self.state[_STATE] = self._fresh_state()
        self._scratch = lay.new_buffer()
        self._view_cache: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------ set-up
    def _resolve_blocks(self, blocks: str | Sequence[Sequence[Tensor]]) -> list[list[Tensor]]:
        all_params = [p for g in self.param_groups for p in g["params"]]
        if blocks == "tensor":
            return [[p] for p in all_params]
        if blocks == "group":
            return [list(g["params"]) for g in self.param_groups if g["params"]]
        if isinstance(blocks, str):
            raise ValueError(f"blocks={blocks!r}: expected 'tensor', 'group' or lists of params")
        given = [list(b) for b in blocks]
        ids = [id(p) for b in given for p in b]
        if len(set(ids)) != len(ids) or set(ids) != {id(p) for p in all_params}:
            raise ValueError("blocks must partition the optimizer's parameters exactly once each")
        if any(not b for b in given):
            raise ValueError("blocks must not be empty")
        return given

    def _group_of_blocks(self, blocks: list[list[Tensor]]) -> list[int]:
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        out = []
        for block in blocks:
            groups = {group_of[id(p)] for p in block}
            if len(groups) != 1:
                raise ValueError(f"a block spans parameter groups {sorted(groups)}; each block "
                                 "must lie inside one group")
            out.append(groups.pop())
        return out

    def _fresh_state(self) -> dict[str, Any]:
        lay = self._layout
        k_own = self._own.stop - self._own.start
        n_own = len(lay.shards[self._rank])
        m2 = 2 * self.history_size
        dev = lay.chunk_block.device
        counters = torch.zeros(n_own, dtype=torch.long, device=dev)
        return {
            "step": 0,
            "skipped_steps": 0,
            "shard": [self._rank, self._world],
            "last_lrs": [0.0] * len(self.param_groups),
            "param_ema": lay.new_buffer(k_own),
            "grad_ema": lay.new_buffer(k_own),
            "param_snapshot": lay.new_buffer(k_own),
            "grad_snapshot": lay.new_buffer(k_own),
            "momentum_buffer": lay.new_buffer(),
            "history": torch.zeros(k_own, m2, lay.chunk_size, dtype=lay.dtype, device=dev),
            "gram": torch.zeros(n_own, m2, m2, dtype=lay.dtype, device=dev),
            "head": counters.clone(),
            "count": counters.clone(),
            "pairs_accepted": counters.clone(),
            "pairs_rejected": counters.clone(),
            "damping_activations": counters.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"].get(_STATE)
        fresh = self.state[_STATE]  # created eagerly: the shapes, dtypes and devices to match
        if saved is None or set(saved) != set(fresh):
            raise ValueError("state_dict was not saved by a MomentumLBFGS optimizer")
        if list(saved["shard"]) != fresh["shard"]:
            raise ValueError(f"state_dict holds the shard (rank, world) = {saved['shard']}, this "
                             f"optimizer is {fresh['shard']}: each rank loads its own state")
        for key, ref in fresh.items():
            if isinstance(ref, Tensor) and saved[key].shape != ref.shape:
                raise ValueError(f"state_dict entry {key!r} has shape {tuple(saved[key].shape)},"
                                 f" expected {tuple(ref.shape)} (different model, blocks or "
                                 f"history_size?)")
        super().load_state_dict(state_dict)  # replaces self.state; `fresh` keeps the old one
        own = self.state[_STATE]
        for key, ref in fresh.items():
            if isinstance(ref, Tensor):
                own[key] = own[key].to(device=ref.device, dtype=ref.dtype, copy=True)
        own["last_lrs"] = list(own["last_lrs"])
        self._view_cache.clear()

    # ------------------------------------------------------------------ helpers
    def _own_views(self, name: str) -> list[Tensor]:
        """Views of this rank's curvature buffer ``name`` shaped like its own parameters."""
        if name not in self._view_cache:
            self._view_cache[name] = self._layout.views(
                self.state[_STATE][name], self._own_params, self._own.start)
        return self._view_cache[name]

    def _history(self) -> History:
        st = self.state[_STATE]
        return History(st["history"], st["gram"], st["head"], st["count"],
                       self._own_chunk_block)

    def _ema(self, ema: Tensor | list[Tensor], x: Tensor | list[Tensor]) -> None:
        if isinstance(ema, Tensor):
            ema, x = [ema], [x]  # type: ignore[list-item]
        if self.ema_normalized:
            torch._foreach_lerp_(ema, x, 1.0 - self.beta)
        else:
            torch._foreach_mul_(ema, self.beta)
            torch._foreach_add_(ema, x)

    def _update_curvature(self, t: int, g_own: Tensor) -> None:
        """EMAs every step; every T steps a new pair (from step 2T) and new snapshots."""
        st = self.state[_STATE]
        T = self.update_period
        if t == 1:
            torch._foreach_copy_(self._own_views("param_ema"), self._own_params)
            st["grad_ema"].copy_(g_own)
        else:
            self._ema(self._own_views("param_ema"), self._own_params)
            self._ema(st["grad_ema"], g_own)
        if t % T == 0:
            if t >= 2 * T:
                self._form_pair()
            st["param_snapshot"].copy_(st["param_ema"])
            st["grad_snapshot"].copy_(st["grad_ema"])
            if self.grad_ema_reset:
                st["grad_ema"].copy_(g_own)

    def _form_pair(self) -> None:
        st = self.state[_STATE]
        h = self._history()
        s = st["param_ema"] - st["param_snapshot"]
        y = st["grad_ema"] - st["grad_snapshot"]
        if self.pair_momentum > 0.0:
            s_prev, y_prev = newest_pair(h)
            a = torch.where(h.count > 0, self.pair_momentum, 0.0)[h.chunk_block].unsqueeze(1)
            s = (1.0 - a) * s + a * s_prev
            y = (1.0 - a) * y + a * y_prev
        ss = block_dot(s, s, h.chunk_block, h.num_blocks)
        sy = block_dot(s, y, h.chunk_block, h.num_blocks)
        tau, active = tau_coefficient(sy, ss, self.sigma_low, self.sigma_high, self.tau_max)
        accept = torch.isfinite(tau) & (ss > 0)
        t = torch.where(accept, tau, 0.0)[h.chunk_block].unsqueeze(1)
        push(h, s, t * y + (1.0 - t) * s, accept)
        st["pairs_accepted"] += accept
        st["pairs_rejected"] += ~accept
        st["damping_activations"] += accept & active

    def _apply_step_rule(self, d: Tensor, g_norm: Tensor | None, g: Tensor | None) -> Tensor:
        if self.step_rule == "none":
            return d
        d_norm = torch.linalg.vector_norm(d)
        if self.step_rule == "unit":
            return d / d_norm.clamp(min=torch.finfo(d.dtype).tiny)
        if self.step_rule == "grad_norm":
            assert g_norm is not None
            return d * (g_norm / d_norm.clamp(min=torch.finfo(d.dtype).tiny))
        assert g is not None
        lrs = torch.tensor([group["lr"] for group in self.param_groups], dtype=d.dtype,
                           device=d.device)[self._chunk_group]
        gd = (lrs**2 * (g * d).sum(-1)).sum()
        nu = torch.where(gd > 0, (self.kl_clip / gd.clamp(min=1e-300)).sqrt(), 1.0).clamp(max=1)
        return d * nu

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step. ``closure`` (optional) re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        st = self.state[_STATE]
        lay = self._layout
        d = self._scratch  # full layout: gradient, then direction
        if "scratch" not in self._view_cache:
            self._view_cache["scratch"] = lay.views(d)
        d_views = self._view_cache["scratch"]
        with_grad = [p.grad is not None for p in lay.params]
        if not any(with_grad):
            return loss
        grads = [p.grad for p in lay.params if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("MomentumLBFGS does not support sparse gradients")
        torch._foreach_copy_([v for v, w in zip(d_views, with_grad) if w], grads)
        if not all(with_grad):
            torch._foreach_zero_([v for v, w in zip(d_views, with_grad) if not w])
        if not bool(torch.isfinite(d).all()):
            st["skipped_steps"] += 1
            return loss

        t = st["step"] = st["step"] + 1
        if self._own_params:  # a rank may own no block
            self._update_curvature(t, d[self._own])

        active = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        for group, params in zip(self.param_groups, active):
            if group["weight_decay"] != 0 and params:
                torch._foreach_add_(lay.views(d, params), params, alpha=group["weight_decay"])
        if t >= 2 * self.update_period:
            raw = d.clone() if self.step_rule == "kl_clip" else None
            g_norm = torch.linalg.vector_norm(d) if self.step_rule == "grad_norm" else None
            h = self._history()
            own_dir = d[self._own]
            if self._own_params:
                own_dir = compact_apply(h, own_dir.unsqueeze(1), newest_gamma(h)).squeeze(1)
            if self._group is None:
                d = own_dir
            else:
                d = all_gather_rows(own_dir, lay.shard_size, self._group)
            d = self._apply_step_rule(d, g_norm, raw)
        u = st["momentum_buffer"]
        for i, (group, params) in enumerate(zip(self.param_groups, active)):
            if not params:
                continue
            u_views = lay.views(u, params)
            torch._foreach_mul_(u_views, group["momentum"])
            torch._foreach_add_(u_views, lay.views(d, params))
            torch._foreach_add_(params, u_views, alpha=-group["lr"])
            st["last_lrs"][i] = group["lr"]
        return loss

    # ------------------------------------------------------------------ reporting
    @torch.no_grad()
    def diagnostics(self) -> dict[str, Any]:
        """Counters for logging (this call synchronises with the device).

        ``pairs_accepted`` / ``pairs_rejected`` / ``damping_activations`` are totals over blocks
        (``*_per_block`` lists give them per block); ``history_length`` is per block;
        ``last_step_norm`` is ``‖Δθ‖`` of the last step; ``skipped_steps`` counts steps skipped
        for non-finite gradients.
        """
        st = self.state[_STATE]
        sq = 0.0
        for i, group in enumerate(self.param_groups):
            if group["params"]:
                norms = torch._foreach_norm(self._layout.views(st["momentum_buffer"],
                                                               group["params"]))
                sq += st["last_lrs"][i] ** 2 * float(sum(n.double() ** 2 for n in norms))
        out: dict[str, Any] = {"step": st["step"], "skipped_steps": st["skipped_steps"],
                               "last_step_norm": math.sqrt(sq),
                               "history_length": st["count"].tolist()}
        for key in ("pairs_accepted", "pairs_rejected", "damping_activations"):
            out[key] = int(st[key].sum())
            out[key + "_per_block"] = st[key].tolist()
        return out
