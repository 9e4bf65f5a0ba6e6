"""mL-BFGS: momentum-based block-wise L-BFGS (Niu, Fabian, Lee, Soltanolkotabi & Avestimehr,
TMLR 2023, arXiv 2307.13744). The algorithm, the released-code mode and the dtypes are
described in ``docs/momentum_lbfgs.md``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from secant.distributed import (
    all_gather_rows,
    all_reduce_flat,
    assign_blocks,
    check_consistent,
    local,
    resolve_group,
    shard_group,
)
from secant.linalg import (
    History,
    block_dot,
    compact_apply,
    newest_gamma,
    newest_pair,
    pair_spectrum,
    push,
    tau_coefficient,
)
from secant.optim import momentum_lbfgs_state as saved_state
from secant.optim.block_layout import BlockLayout
from secant.optim.contract import OptimizerContract, check_compile, check_lr, scalars
from secant.optim.validation import check

STEP_RULES = ("grad_norm", "unit", "kl_clip", "none")
_STATE = "mlbfgs"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _flat(ts: list[Tensor]) -> Tensor:
    """The tensors flattened and concatenated (a view, no copy, for one tensor)."""
    return ts[0].reshape(-1) if len(ts) == 1 else torch.cat([t.reshape(-1) for t in ts])


def _write_runs(flat: Tensor, runs: tuple[tuple[int, int, int], ...],
                tensors: list[Tensor]) -> None:
    """Copy ``tensors`` (in order; any float dtype) into their runs ``(start, stop, count)``
    of ``flat``, one concatenation per run."""
    it = iter(tensors)
    for start, stop, count in runs:
        torch.cat([next(it).reshape(-1) for _ in range(count)], out=flat[start:stop])


class MomentumLBFGS(OptimizerContract):
    r"""Momentum-based block-wise L-BFGS (mL-BFGS).

    Use::

        opt = MomentumLBFGS(model.parameters(), lr=0.1, weight_decay=5e-4)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    like :class:`torch.optim.SGD` (LR schedulers, ``state_dict``, ``torch.amp.GradScaler``,
    ``add_param_group``, DDP all work). ``MomentumLBFGS.released(params, lr, blocks=...)`` is the
    authors' released block optimizer. float16/bfloat16 parameters keep their curvature state in
    float32. Not supported: sparse or complex parameters, parameters of mixed dtypes or
    devices, ``add_param_group`` under a process group, closures that need several evaluations.

    Every step keeps exponential moving averages of the parameters and of the gradients of
    each block :math:`b` (normalised EMAs, initialised with the first values)::

        Mθ_b ← β Mθ_b + (1 − β) θ_b        Mg_b ← β Mg_b + (1 − β) g_b

    Every ``update_period`` (T) steps, from step 2T on, a curvature pair is formed from the
    differences of the averages since the previous snapshot, ``s = Mθ − Pθ``, ``y = Mg − Pg``
    (on a quadratic ``y = A s`` holds exactly: the averages are exact secants), damped by the
    τ-rule so that ``sᵀŷ / sᵀs ∈ [σ_L, σ_H]`` (``docs/momentum_lbfgs.md``), and pushed into the
    block's ring of ``history_size`` (m) pairs. A pair with any non-finite entry is rejected.

    The direction is the L-BFGS product of the block-diagonal inverse-Hessian approximation with
    the weight-decayed gradient, ``d_b = H_b (g_b + λ θ_b)`` with ``H₀ = γ I`` and
    ``γ = sᵀŷ / ŷᵀŷ`` of the newest pair, applied to all blocks at once in the compact form
    (:func:`secant.linalg.compact_apply`). It then goes through the ``step_rule`` and heavy-ball
    momentum: ``u ← μ u + d``, ``θ ← θ − η u``. Before the first pair exists (steps 1..2T−1) the
    update is exactly :class:`torch.optim.SGD` with the same momentum and weight decay.

    Args:
        params: parameters, named parameters or parameter groups (``lr``, ``momentum`` and
            ``weight_decay`` may be set per group).
        lr: learning rate η (paper runs: 0.1 with cosine decay; a number or a one-element
            tensor).
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
            per parameter tensor) or a list of lists of parameters, each block inside one group
            and no parameter in two blocks. The Hessian approximation is block-diagonal over
            these blocks. Default ``"group"`` by measurement (``benchmarks/mlbfgs_defaults.md``):
            with one block per tensor every small tensor (a bias) gets its own noisy pairs and
            its own ``γ``, the per-block scalings spread over orders of magnitude and most of
            the step goes into one tensor; on the harness's digits autoencoder the per-tensor
            form never reached the target and diverged at LRs where SGD with momentum trained,
            while one block per group reached it sooner than SGD with momentum. ``"tensor"``
            (the finer split that lets distributed training spread blocks over ranks) stays
            available. Parameters left out of every listed block (as the released ResNet
            partitions leave out the stem and the classifier) get no curvature: SGD with weight
            decay before the first pair, afterwards their raw gradient (no weight decay) scaled
            by the same factor as the blocked directions (see ``step_rule``).
        step_rule: what is done with the quasi-Newton direction ``d`` before momentum, once the
            history is in use (from step 2T). The factor is computed over the blocked
            parameters and applied to all parameters:

            * ``"grad_norm"`` (default) — rescale ``d`` to the global norm of the
              weight-decayed gradient: curvature sets the direction, ``lr`` keeps its SGD meaning
              and the step length is continuous with the warm-up. The most robust rule across
              learning rates in ``benchmarks/mlbfgs_step_rule.md``.
            * ``"unit"`` — divide ``d`` by its global norm (the released ``slimblock.py``):
              ``lr`` is then a step length, while the warm-up before the first pair is SGD at
              that same ``lr``. Fastest on the harness quadratic, because of that warm-up
              (with a normalised warm-up it is level with normalised SGD); the warm-up
              collapses the digits autoencoder at the learning rates the rule needs
              (``benchmarks/mlbfgs_defaults.md``, second study).
            * ``"kl_clip"`` — ``d ← ν d``, ``ν = min(1, sqrt(κ / (η² gᵀd)))`` with ``g`` the
              weight-decayed gradient: the KL clip of K-FAC (Ba et al. 2017). The released
              full-model variant (``slim.py``) uses ``min(1, sqrt(κ / g_rawᵀd))`` (raw
              gradient, no η²); that form is not implemented. Not recommended with momentum:
              while active it gives ``d`` a length independent of ``‖g‖``, and heavy-ball
              momentum then oscillates around the minimum instead of settling, above the
              starting loss at times (``benchmarks/mlbfgs_kl_clip.md``).
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
            about 1/world of the single-process figure; a rank may own no block. Checkpoints:
            each rank saves and loads its own ``state_dict`` (each holds its blocks' state), or
            use ``torch.distributed.checkpoint``.
            **FSDP2 / HSDP** (parameters that are ``DTensor``s from ``fully_shard``; leave
            ``process_group`` unset): each rank keeps the state of its own rows of every block
            (memory per rank ≈ 1/shards of one process's) and the per-block sums — inner
            products, the history's projection ``Zᵀv`` (B × 2m numbers a step) and new Gram
            columns, the step rule's global norms, the finiteness test — are all-reduced over
            the shard ranks: four small all-reduces a step and two more every T steps. The
            iterates equal one process's on the global batch. Every parameter must be a
            ``DTensor`` on one mesh; ``add_param_group`` is refused. Checkpoint with
            ``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` /
            ``set_optimizer_state_dict``): the state is sharded like the parameters, so a
            checkpoint saved on some number of ranks loads on another.
        grad_ema_weight_decay: ``True`` feeds ``(1 + λ) g`` instead of ``g`` into the gradient
            average (the released code adds ``λ g``, not ``λ θ``, there).
        curvature_eps: ε added to ``sᵀs`` in the damping ratio and to ``ŷᵀŷ`` in γ (released
            code: 1e-12).
        maximize: ascend the objective (the gradient is negated before everything else, the
            curvature pairs included), as in :mod:`torch.optim`.
        compile: ``True`` (inductor) or a ``torch.compile`` backend name: the step's math
            (everything after the host-side step count) runs as one compiled graph per kind
            of step (before the curvature, snapshot, pair, curvature step), built at its first
            use and never rebuilt across steps, learning rates or ``zero_grad`` choices; equal
            to eager up to rounding. Refused (``ValueError``) with a ``process_group`` or
            FSDP2 parameters, whose steps have collectives between their parts; plain DDP
            compiles.

    Parameters whose ``.grad`` is ``None`` are not updated in that step (their gradient counts
    as zero in the averages). A step whose gradients are not all finite changes neither the
    parameters nor any state and is counted in :meth:`diagnostics`; this is decided on the
    device (no host synchronisation in :meth:`step`). The pair schedule counts calls of
    :meth:`step` that had gradients, skipped ones included.

    Parameter groups added by :meth:`add_param_group` get new blocks (one per tensor with
    ``blocks="tensor"``, else one for the group) with fresh curvature state: their direction
    is their gradient until their own first pair, two update periods later.
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
        grad_ema_weight_decay: bool = False,
        curvature_eps: float = 0.0,
        maximize: bool = False,
        compile: bool | str = False,  # noqa: A002 (torch.optim's flag style)
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
        check(0.0 <= curvature_eps < math.inf, "curvature_eps", curvature_eps,
              "a finite value >= 0")
        check(isinstance(maximize, bool), "maximize", maximize, "True or False")
        check_compile(compile)
        self.maximize = maximize
        self.compile = compile
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._shard_group = self._fsdp_group(process_group)
        check(not compile or (process_group is None and self._shard_group is None), "compile",
              compile, "False with a process_group or FSDP2 parameters (their step has "
              "collectives between its parts; DDP without a process_group compiles)")
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
        self.grad_ema_weight_decay = grad_ema_weight_decay
        self.curvature_eps = curvature_eps
        self._chunk_size = chunk_size
        self._new_group_blocks = "tensor" if blocks == "tensor" else "group"
        if self._shard_group is None:
            self._process_group, self._rank, self._world = resolve_group(process_group)
        else:  # FSDP2: every rank holds its rows of every block (see _fsdp_group)
            self._process_group, self._rank, self._world = None, 0, 1
        self._build(*self._resolve_blocks(blocks))
        self.state[_STATE] = self._fresh_state()

    @classmethod
    def released(
        cls,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        *,
        blocks: str | Sequence[Sequence[Tensor]] = "group",
        weight_decay: float = 2e-4,
        momentum: float = 0.9,
        history_size: int = 10,
        update_period: int = 50,
        beta: float = 0.999,
        pair_momentum: float = 0.9,
        chunk_size: int = 4096,
        process_group: dist.ProcessGroup | None = None,
    ) -> MomentumLBFGS:
        """The authors' released block optimizer (``opt/slimblock.py`` of yuehniu/mL-BFGS).

        Defaults are its run commands (ResNet: weight decay 2e-4; DeiT: 5e-4). Pass the
        released partition as ``blocks``: parameters left out of every block are handled as
        there. Equal to the released code to float64 rounding for ``update_period >= 2`` (at
        ``update_period = 1`` the released code forms its first pair one step later, which is
        refused here). The released code supports one parameter group; with several, the
        global normalisation here runs over all of them. ``docs/momentum_lbfgs.md`` lists
        every difference from the default (clean) form.
        """
        check(isinstance(update_period, int) and update_period >= 2, "update_period",
              update_period, "an integer >= 2 in the released configuration")
        return cls(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                   history_size=history_size, update_period=update_period, beta=beta,
                   damping=0.01, sigma_low=0.01, sigma_high=1.5, blocks=blocks,
                   step_rule="unit", ema_normalized=False, grad_ema_reset=True,
                   pair_momentum=pair_momentum, chunk_size=chunk_size,
                   process_group=process_group, grad_ema_weight_decay=True,
                   curvature_eps=1e-12)

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its parameters get new blocks with fresh curvature state."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
            if hasattr(self, "_layout"):  # after __init__
                self._grow(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _fsdp_group(self, process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
        """The ranks FSDP2 shards the parameters over (``None`` without ``DTensor``
        parameters). Under FSDP2 (and HSDP) each rank keeps the state of its own rows of every
        block and runs the whole algorithm on them; the per-block sums (inner products, the
        history's projections and Gram columns) and the global norms are all-reduced over
        these ranks, so every rank computes the one-process direction for its rows. Gradients
        arrive averaged over the data-parallel ranks (FSDP2's reduce-scatter)."""
        params = [p for g in self.param_groups for p in g["params"]]
        group = shard_group(params, "MomentumLBFGS")
        if group is None:
            return None
        if not all(isinstance(p, DTensor) for p in params):
            raise ValueError("MomentumLBFGS under FSDP2 needs every parameter sharded (a "
                             "DTensor): shard the whole model with fully_shard, or give the "
                             "unsharded parameters to another optimizer")
        if process_group is not None:
            raise ValueError("process_group: not with FSDP2 parameters (the blocks are split "
                             "over the ranks FSDP2 shards them over; DDP's block ownership "
                             "does not apply)")
        return group

    def _reduce(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over the FSDP2 ranks (``x`` itself without FSDP2)."""
        return x if self._shard_group is None else all_reduce_flat([x], self._shard_group)[0]

    def _norm(self, x: Tensor) -> Tensor:
        """The 2-norm of the whole vector whose local rows are ``x``."""
        return self._reduce(x.square().sum()).sqrt()

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check(0.0 <= group["momentum"] < 1.0, "momentum", group["momentum"], "a value in [0, 1)")
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

    def _resolve_blocks(self, blocks: str | Sequence[Sequence[Tensor]]) -> tuple[
            list[list[Tensor]], dict[int, list[Tensor]]]:
        """Curvature blocks, and the parameters in no block by group index."""
        all_params = [p for g in self.param_groups for p in g["params"]]
        if blocks == "tensor":
            return [[p] for p in all_params], {}
        if blocks == "group":
            return [list(g["params"]) for g in self.param_groups if g["params"]], {}
        if isinstance(blocks, str):
            raise ValueError(f"blocks={blocks!r}: expected 'tensor', 'group' or lists of params")
        given = [list(b) for b in blocks]
        if any(not b for b in given):
            raise ValueError("blocks must not be empty")
        ids = [id(p) for b in given for p in b]
        if len(set(ids)) != len(ids):
            raise ValueError("blocks list a parameter twice: each parameter may be in one "
                             "block at most")
        if not set(ids) <= {id(p) for p in all_params}:
            raise ValueError("blocks hold a parameter that is not in the optimizer's groups")
        blocked = set(ids)
        free = {i: [p for p in g["params"] if id(p) not in blocked]
                for i, g in enumerate(self.param_groups)}
        return given, {i: ps for i, ps in free.items() if ps}

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

    def _build(self, blocks: list[list[Tensor]], free: dict[int, list[Tensor]]) -> None:
        """Layout (curvature blocks sharded over ranks, then the parameters in no block)."""
        self._blocks, self._free = blocks, free
        self._block_group = self._group_of_blocks(blocks) + list(free)
        sizes = [sum(p.numel() for p in b) for b in blocks]
        shards = (assign_blocks(sizes, self._world) if self._process_group
                  else [list(range(len(blocks)))])
        dtype = next(p.dtype for g in self.param_groups for p in g["params"])
        if dtype in _LOW_PRECISION:
            dtype = torch.float32
        lay = self._layout = BlockLayout(blocks + list(free.values()), self._chunk_size,
                                         shards, dtype)
        dev = lay.chunk_block.device
        if self._process_group is not None:
            free_sizes = [sum(p.numel() for p in ps) for ps in free.values()]
            setup = (f"{[tuple(p.shape) for p in lay.params]} {sizes} {free_sizes} "
                     f"m={self.history_size} T={self.update_period} c={lay.chunk_size} "
                     f"{lay.dtype}")
            check_consistent(setup, self._process_group, dev,
                             "the parameters, blocks or MomentumLBFGS settings")
        # This rank's curvature state: its own blocks' chunks only.
        self._own = lay.shard_chunks(self._rank)
        own_blocks = lay.shards[self._rank]
        local = {b: i for i, b in enumerate(own_blocks)}
        self._own_chunk_block = torch.tensor(
            [local[int(b)] for b in lay.chunk_block[self._own]], dtype=torch.long, device=dev)
        self._own_params = [p for b in own_blocks for p in blocks[b]]
        self._free_params = {p for ps in free.values() for p in ps}  # tensors hash by identity
        self._chunk_group = torch.tensor(self._block_group, dtype=torch.long,
                                         device=dev)[lay.chunk_block]
        self._scratch = lay.new_buffer()
        self._theta = lay.new_buffer(self._own.stop - self._own.start)
        self._one_minus_beta = torch.tensor(1.0 - self.beta, dtype=lay.dtype, device=dev)
        self._beta = torch.tensor(self.beta, dtype=lay.dtype, device=dev)
        self._run_cache: dict[tuple, tuple[tuple[int, int, int], ...]] = {}
        self._turn: Tensor | None = None  # per own block gᵀd, gᵀg, dᵀd of the last direction

    def _fresh_state(self) -> dict[str, Any]:
        lay = self._layout
        k_own = self._own.stop - self._own.start
        n_own = len(lay.shards[self._rank])
        m2 = 2 * self.history_size
        dev = lay.chunk_block.device
        counters = torch.zeros(n_own, dtype=torch.long, device=dev)
        flags = torch.zeros(n_own, dtype=torch.bool, device=dev)
        return {
            "step": 0,
            "skipped_steps": torch.zeros((), dtype=torch.long, device=dev),
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
            "ema_started": flags.clone(),
            "has_snapshot": flags.clone(),
        }

    def _grow(self, group: dict[str, Any]) -> None:
        """Rebuild the layout with new blocks for ``group``, carrying the old state over."""
        if self._process_group is not None or self._shard_group is not None:
            raise ValueError("add_param_group is not supported with a process group or FSDP2: "
                             "blocks are laid out at construction; pass every group then")
        params = list(group["params"])
        new = [[p] for p in params] if self._new_group_blocks == "tensor" else [params]
        old_lay, old_st, old_own = self._layout, self.state[_STATE], self._own_params
        self._build(self._blocks + [b for b in new if b], self._free)
        lay, st = self._layout, self._fresh_state()

        def carry(new_buf: Tensor, old_buf: Tensor, ps: list[Tensor]) -> None:
            if ps:
                torch._foreach_copy_(lay.views(new_buf, ps), old_lay.views(old_buf, ps))

        for key in saved_state.OWN_VECTORS:
            carry(st[key], old_st[key], old_own)
        carry(st["momentum_buffer"], old_st["momentum_buffer"], old_lay.params)
        for j in range(st["history"].shape[1]):
            slot = lay.new_buffer(st["history"].shape[0])
            carry(slot, old_st["history"][:, j].contiguous(), old_own)
            st["history"][:, j] = slot
        for key in saved_state.PER_BLOCK:
            st[key][: len(old_st[key])] = old_st[key]
        st["step"], st["skipped_steps"] = old_st["step"], old_st["skipped_steps"]
        st["last_lrs"][: len(old_st["last_lrs"])] = old_st["last_lrs"]
        self.state[_STATE] = st

    def __getstate__(self) -> dict[str, Any]:
        # the run bounds are cached by the parameters' ids: a copy's parameters are others
        return super().__getstate__() | {"_run_cache": {}}

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` format, every entry keyed by a parameter (what
        ``torch.distributed.checkpoint`` needs): each parameter's entry holds its part of the
        flat state, shaped like it (``DTensor``s under FSDP2), and the per-block and
        optimizer-wide values sit in the entries of the blocks' first parameters under
        ``mlbfgs_*`` keys (:mod:`secant.optim.momentum_lbfgs_state`)."""
        sd = super().state_dict()
        flat = sd["state"].pop(_STATE)
        params = [p for g in self.param_groups for p in g["params"]]
        index = {p: i for i, p in enumerate(params)}  # tensors hash by identity
        sd["state"] = {index[p]: e for p, e in saved_state.param_entries(self, flat).items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fresh = self._fresh_state()
        params = [p for g in self.param_groups for p in g["params"]]

        def entries(sd: dict[str, Any]) -> dict[Tensor, dict[str, Any]]:
            ids = [i for g in sd["param_groups"] for i in g["params"]]
            return {p: sd["state"][i] for i, p in zip(ids, params) if i in sd["state"]}

        sd = self._load_hooked(state_dict,
                               lambda sd: saved_state.check_entries(self, entries(sd), fresh))
        # from the saved dict, not from self.state: the base class casts every tensor there
        # to its parameter's dtype (the counters and flags too)
        saved_state.load_entries(self, entries(sd), fresh)
        self.state.clear()
        self.state[_STATE] = fresh
        self._run_cache.clear()

    # ------------------------------------------------------------------ helpers
    def _runs(self, params: list[Tensor], first_chunk: int = 0
              ) -> tuple[tuple[int, int, int], ...]:
        """:meth:`BlockLayout.runs` of ``params`` as ``(start, stop, count)``, cached for the
        layout's lifetime (by the parameters' identities)."""
        key = (first_chunk, *map(id, params))
        if key not in self._run_cache:
            self._run_cache[key] = tuple((sl.start, sl.stop, len(ps)) for sl, ps in
                                         self._layout.runs(params, first_chunk))
        return self._run_cache[key]

    def _history(self, st: dict[str, Any] | None = None) -> History:
        """The history ring of ``st`` (default: the optimizer's state)."""
        st = self.state[_STATE] if st is None else st
        return History(st["history"], st["gram"], st["head"], st["count"],
                       self._own_chunk_block,
                       None if self._shard_group is None else self._reduce)

    def _ema(self, ema: Tensor, x: Tensor, started: Tensor, ok: Tensor) -> None:
        """``ema ← β ema + (1−β) x`` (or ``β ema + x``) where ``ok``; ``x`` where not started."""
        if self.ema_normalized:
            ema.lerp_(x, torch.where(started, self._one_minus_beta, 1.0) * ok)
        else:
            ema.mul_(torch.where(ok, torch.where(started, self._beta, 0.0), 1.0))
            ema.addcmul_(x, ok.to(ema.dtype))

    def _update_curvature(self, st: dict[str, Any], snapshot: bool, pair: bool,
                          theta_runs: tuple, g_own: Tensor, ok: Tensor, wd_own: Tensor) -> None:
        """EMAs every step; every T steps (``snapshot``) new snapshots, and from step 2T
        (``pair``) a new pair before them. ``wd_own``: each own chunk's weight decay;
        ``theta_runs``: the own parameters' runs in ``θ``'s buffer.

        Every update is masked on the device by ``ok`` (all gradients finite)."""
        theta = self._theta
        _write_runs(theta.view(-1), theta_runs, [local(p) for p in self._own_params])
        if self.grad_ema_weight_decay:
            g_own = torch.addcmul(g_own, g_own, wd_own.unsqueeze(1))
        started = st["ema_started"][self._own_chunk_block].unsqueeze(1)
        self._ema(st["param_ema"], theta, started, ok)
        self._ema(st["grad_ema"], g_own, started, ok)
        st["ema_started"] |= ok
        if snapshot:
            if pair:
                self._form_pair(st, ok)
            for ema, snap in (("param_ema", "param_snapshot"), ("grad_ema", "grad_snapshot")):
                torch.where(ok, st[ema], st[snap], out=st[snap])
            st["has_snapshot"] |= ok
            if self.grad_ema_reset:
                torch.where(ok, g_own, st["grad_ema"], out=st["grad_ema"])

    def _form_pair(self, st: dict[str, Any], ok: Tensor) -> None:
        h = self._history(st)
        attempt = st["has_snapshot"] & ok
        s = st["param_ema"] - st["param_snapshot"]
        y = st["grad_ema"] - st["grad_snapshot"]
        if self.pair_momentum > 0.0:
            s_prev, y_prev = newest_pair(h)
            a = (h.count > 0).to(s.dtype).mul_(self.pair_momentum)[h.chunk_block].unsqueeze(1)
            s = (1.0 - a) * s + a * s_prev
            y = (1.0 - a) * y + a * y_prev
        ss, sy = self._reduce(torch.stack([block_dot(s, s, h.chunk_block, h.num_blocks),
                                           block_dot(s, y, h.chunk_block, h.num_blocks)]))
        tau, active = tau_coefficient(sy, ss + self.curvature_eps, self.sigma_low,
                                      self.sigma_high, self.tau_max)
        accept = torch.isfinite(tau) & (ss > 0) & attempt
        t = torch.where(accept, tau, 0.0)[h.chunk_block].unsqueeze(1)
        push(h, s, t * y + (1.0 - t) * s, accept)
        st["pairs_accepted"] += accept
        st["pairs_rejected"] += attempt & ~accept
        st["damping_activations"] += accept & active

    def _precondition(self, st: dict[str, Any], d: Tensor, lr_chunks: Tensor) -> Tensor | None:
        """Replace the blocked rows of ``d`` by their directions, then apply the step rule's
        factor (computed over the blocked rows; ``lr_chunks``: each chunk's learning rate) to
        all of ``d``. Returns the per own block ``gᵀd, gᵀg, dᵀd`` (``None`` without a block)."""
        lay = self._layout
        blocked = d[: lay.curvature_rows]
        rule = self.step_rule
        raw = blocked.clone() if rule == "kl_clip" else None
        g_norm = self._norm(blocked) if rule == "grad_norm" else None
        own_dir = d[self._own]
        turn = None
        if self._own_params:  # a rank may own no block
            h = self._history(st)
            grad = own_dir
            own_dir = compact_apply(h, grad.unsqueeze(1),
                                    newest_gamma(h, self.curvature_eps)).squeeze(1)
            turn = torch.stack([block_dot(a, b, h.chunk_block, h.num_blocks)
                                for a, b in ((grad, own_dir), (grad, grad), (own_dir, own_dir))])
        if self._process_group is None:
            d[self._own] = own_dir
        else:
            all_gather_rows(own_dir, lay.shard_size, self._process_group, out=blocked)
        if rule == "none":
            return turn
        d_norm = self._norm(blocked).clamp(min=torch.finfo(d.dtype).tiny)
        if rule == "unit":
            d.div_(d_norm)
        elif rule == "grad_norm":
            assert g_norm is not None
            d.mul_(g_norm / d_norm)
        else:
            assert raw is not None
            lrs = lr_chunks[: lay.curvature_rows]
            gd = self._reduce((lrs**2 * (raw * blocked).sum(-1)).sum())
            nu = torch.where(gd > 0, (self.kl_clip / gd.clamp(min=1e-300)).sqrt(), 1.0)
            d.mul_(nu.clamp(max=1))
        return turn

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
        with_grad = tuple(p.grad is not None for p in lay.params)
        if not any(with_grad):
            return loss
        grads = [local(p.grad) for p in lay.params if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("MomentumLBFGS does not support sparse gradients")
        t = st["step"] = st["step"] + 1
        period = self.update_period
        kind = (t >= 2 * period and lay.curvature_rows > 0, t % period == 0,
                t % period == 0 and t >= 2 * period)  # curvature, snapshot, pair
        groups = self.param_groups
        per_group = scalars([g[k] for k in ("lr", "weight_decay") for g in groups],
                            lay.dtype, lay.chunk_block.device)
        active = [[p for p in g["params"] if p.grad is not None] for g in groups]
        decayed = [[p for p in ps if not (kind[0] and p in self._free_params)]
                   if g["weight_decay"] != 0 else [] for g, ps in zip(groups, active)]
        runs = (self._runs([p for p, w in zip(lay.params, with_grad) if w]),
                self._runs([p for p, w in zip(lay.params, with_grad) if not w]),
                self._runs(self._own_params, self._own.start),
                tuple(map(self._runs, active)), tuple(map(self._runs, decayed)))
        constants = (*kind, runs, tuple(g["momentum"] for g in groups),
                     tuple(g["weight_decay"] for g in groups))
        turn = self._compiled(("step", constants), functools.partial(
            type(self)._apply, self, *constants))(
            {k: v for k, v in st.items() if isinstance(v, Tensor)}, grads, active, decayed,
            per_group)
        if turn is not None:
            self._turn = turn
        for i, group in enumerate(groups):
            if any(p.grad is not None for p in group["params"]):
                lr = group["lr"]
                st["last_lrs"][i] = lr.clone() if isinstance(lr, Tensor) else lr
        return loss

    def _apply(self, curvature: bool, snapshot: bool, pair: bool, runs: tuple,
               momenta: tuple[float, ...], weight_decays: tuple[float, ...],
               st: dict[str, Tensor], grads: list[Tensor], active: list[list[Tensor]],
               decayed: list[list[Tensor]], per_group: Tensor) -> Tensor | None:
        """The step's math after its host-side bookkeeping, in place (one compiled graph with
        ``compile``): ``st`` the state's tensors, ``grads`` those of the layout's parameters
        that have one; per group its parameters with a gradient (``active``), those to decay
        (``decayed``), its momentum and weight decay; ``per_group`` the groups' learning rates,
        then their weight decays; ``runs`` (:meth:`_runs`) where the gradients, the parameters
        without one, the own parameters in ``θ`` and each group's active and decayed
        parameters lie in the flat buffers: the buffers are written run by run, not view by
        view. Returns :meth:`_precondition`'s block inner products on a curvature step."""
        grad_runs, missing_runs, theta_runs, active_runs, decayed_runs = runs
        lay = self._layout
        d = self._scratch  # full layout: gradient, then direction, then masked update
        flat = d.view(-1)
        _write_runs(flat, grad_runs, grads)
        for start, stop, _ in missing_runs:
            flat[start:stop].zero_()
        if self.maximize:
            d.neg_()
        # stays on the device: a bad step is masked, not branched; skipped on every rank together
        ok = self._reduce((~torch.isfinite(d)).sum()) == 0
        d.masked_fill_(~ok, 0.0)
        st["skipped_steps"] += ~ok
        lr_chunks, wd_chunks = per_group.view(2, -1)[:, self._chunk_group]
        if self._own_params:
            self._update_curvature(st, snapshot, pair, theta_runs, d[self._own], ok,
                                   wd_chunks[self._own])
        for params, group_runs, weight_decay in zip(decayed, decayed_runs, weight_decays):
            it = iter(local(p) for p in params)
            for start, stop, count in group_runs:
                flat[start:stop].add_(_flat([next(it) for _ in range(count)]),
                                      alpha=weight_decay)
        turn = self._precondition(st, d, lr_chunks) if curvature else None
        d.mul_(ok)
        u = st["momentum_buffer"]
        u_flat = u.view(-1)
        for group_runs, momentum in zip(active_runs, momenta):
            if group_runs:
                mu = torch.where(ok, torch.full((), momentum, dtype=u.dtype, device=u.device),
                                 1.0)
                for start, stop, _ in group_runs:
                    u_flat[start:stop].mul_(mu).add_(flat[start:stop])
        torch.mul(u, ok, out=d)
        if torch.compiler.is_compiling() or any(isinstance(g["lr"], Tensor)
                                                for g in self.param_groups):
            # the learning rates as data: no recompilation, no host sync
            d.mul_(lr_chunks.unsqueeze(1))
            stepped = [p for params in active for p in params]
            torch._foreach_sub_([local(p) for p in stepped], lay.views(d, stepped))
            return turn
        for group, params in zip(self.param_groups, active):  # as torch.optim.SGD, bit for bit
            if params:
                torch._foreach_add_([local(p) for p in params], lay.views(d, params),
                                    alpha=-group["lr"])
        return turn

    # ------------------------------------------------------------------ reporting
    @torch.no_grad()
    def diagnostics(self) -> dict[str, Any]:
        """Counters and curvature measures for logging (this call synchronises with the device).

        Counters: ``pairs_accepted`` / ``pairs_rejected`` / ``damping_activations`` are totals
        over blocks (``*_per_block`` lists give them per block, in block order);
        ``history_length`` is per block; ``last_step_norm`` is ``‖Δθ‖`` of the last step;
        ``step`` counts applied steps and ``skipped_steps`` those skipped for non-finite
        gradients.

        How far the curvature turns the step, per block, for the last step that used it
        (``g`` the block's weight-decayed gradient, ``d = H g`` its direction before the step
        rule and momentum; NaN before the first such step):

        * ``direction_cosine_per_block``: ``gᵀd / (‖g‖ ‖d‖)``. 1 means ``H`` acts on ``g`` as
          a multiple of the identity: the step is (normalised) SGD. ``direction_cosine`` is
          the same over all blocks together (blocks with different ``γ`` turn the whole step
          even where each block's own cosine is 1).
        * ``direction_norm_ratio_per_block``: ``‖d‖ / ‖g‖``, the step length the curvature
          gives relative to the gradient's (before the step rule rescales all blocks
          together).

        What the history implies, per block (NaN while a block has no pair):

        * ``gamma_per_block``: the initial scaling ``γ = sᵀŷ / ŷᵀŷ`` of the newest pair
          (``H₀ = γ I``; 1/γ is a curvature estimate).
        * ``curvature_min_per_block``, ``curvature_max_per_block``: the range of the stored
          pairs' Rayleigh quotients ``sᵀŷ / sᵀs``. The τ-rule keeps them inside
          ``[σ_L, σ_H]`` (a value at a bound: that pair was damped); a narrow range means the
          pairs see one curvature value, which ``H`` can only turn into a multiple of ``I``
          along the pairs' span.
        * ``pair_span_per_block``: the effective number of independent directions of the
          stored ``s`` vectors (:func:`secant.linalg.pair_spectrum`), between 1 (all parallel)
          and ``history_length``.

        Under a process group the per-block values are gathered over the ranks (each rank holds
        its own blocks'): this is a collective that every rank must call. Under FSDP2 the
        sums over rows are all-reduced over the shard ranks: a collective too.
        """
        st = self.state[_STATE]
        sq = 0.0
        for i, group in enumerate(self.param_groups):
            if group["params"]:
                norms = torch._foreach_norm(self._layout.views(st["momentum_buffer"],
                                                               group["params"]))
                sq += st["last_lrs"][i] ** 2 * float(self._reduce(
                    sum(n.double() ** 2 for n in norms)))
        keys = ("count", "pairs_accepted", "pairs_rejected", "damping_activations")
        per_block = torch.stack([st[k] for k in keys])
        measures = ("gd", "gg", "dd", "gamma", "curvature_min", "curvature_max", "pair_span")
        curv = self._curvature_measures()
        if self._process_group is not None:
            own = self._layout.shards[self._rank]
            full = per_block.new_zeros(len(keys), len(self._blocks))
            full[:, own] = per_block
            full_curv = curv.new_zeros(len(measures), len(self._blocks))
            full_curv[:, own] = curv
            per_block, curv = all_reduce_flat([full, full_curv], self._process_group)
        skipped = int(st["skipped_steps"])
        out: dict[str, Any] = {"step": st["step"] - skipped, "skipped_steps": skipped,
                               "last_step_norm": math.sqrt(sq),
                               "history_length": per_block[0].tolist()}
        for key, row in zip(keys[1:], per_block[1:]):
            out[key] = int(row.sum())
            out[key + "_per_block"] = row.tolist()
        gd, gg, dd, *spectrum = curv
        out["direction_cosine"] = float(gd.sum() / (gg.sum() * dd.sum()).sqrt())
        out["direction_cosine_per_block"] = (gd / (gg * dd).sqrt()).tolist()
        out["direction_norm_ratio_per_block"] = (dd / gg).sqrt().tolist()
        for key, row in zip(measures[3:], spectrum):
            out[key + "_per_block"] = row.tolist()
        return out

    def _curvature_measures(self) -> Tensor:
        """``[7, own blocks]`` float64: ``gᵀd``, ``gᵀg``, ``dᵀd`` of the last direction, γ, min
        and max Rayleigh quotient, span (see :meth:`diagnostics`)."""
        n_own = len(self._layout.shards[self._rank])
        if not self._own_params:
            return torch.zeros(7, 0, dtype=torch.float64, device=self._layout.chunk_block.device)
        h = self._history()
        turn = (torch.full((3, n_own), math.nan, dtype=torch.float64, device=h.z.device)
                if self._turn is None else self._reduce(self._turn.double()))
        gamma = torch.where(h.count > 0, newest_gamma(h, self.curvature_eps), math.nan)
        return torch.cat([turn, torch.stack([gamma, *pair_spectrum(h)]).double()])
