"""Pure pieces of the Neumann optimizer (Krishnan, Xiao & Saurous, ICLR 2018, arXiv 1712.03298).

No optimizer state here: the μ schedule, the reset schedule, the guarded regulariser coefficient
and Algorithm 1 (the idealised inner loop) as a reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def mu_schedule(step: int, period: float, mu_min: float, mu_max: float) -> float:
    r"""Momentum μ at Neumann step ``step`` (1-based, counted after the burn-in).

    Paper §3.3 / Table 1: ``μ ∝ 1 − 1/(1 + t)`` with ``t`` in epochs, from 0.5 up to 0.9. Here
    ``t = step / period`` is continuous (``period`` = steps per epoch), so::

        μ = clip(1 − 1/(1 + step/period), mu_min, mu_max) = clip(step/(step + period), ...)

    which is 0.5 at one period and 0.9 at nine. ``mu_min == mu_max`` gives a constant μ.
    """
    raw = step / (step + period) if step > 0 else 0.0
    return min(mu_max, max(mu_min, raw))


def reset_steps(first_period: int, count: int) -> list[int]:
    """The first ``count`` Neumann steps (1-based, after burn-in) that reset the iterate ``m``.

    Step 1 resets (``t ≡ 1 (mod K)`` in Algorithm 2), then the gap starts at ``K =
    first_period`` and doubles after every reset: ``1, 1+K, 1+3K, 1+7K, …`` (with K = 10 epochs:
    resets 10, 30, 70, 150 epochs after the burn-in, ALGORITHMS.md §4.4 (v)).
    """
    out, nxt, gap = [], 1, first_period
    for _ in range(count):
        out.append(nxt)
        nxt, gap = nxt + gap, 2 * gap
    return out


def regulariser_coefficient(r_norm: Tensor, alpha: float, beta: float, eps: float) -> Tensor:
    r"""Coefficient ``c`` with ``∇_w[(α/3)‖r‖³ + β/‖r‖] = c · r``, ``r = w − v`` (v held fixed).

    ``c = (α‖r‖² − β/‖r‖²) / ‖r‖ = α‖r‖ − β/‖r‖³`` (paper §3.2). ``beta`` here is the effective
    weight (Table 1: 1e-5 × number of parameters). Guard: ``c = 0`` where ``‖r‖ ≤ eps``, so
    ``w = v`` gives no NaN; no host sync.
    """
    ok = r_norm > eps
    safe = torch.where(ok, r_norm, torch.ones_like(r_norm))
    return torch.where(ok, alpha * safe - beta / safe**3, torch.zeros_like(r_norm))


def neumann_inner_loop(grad: Callable[[Tensor], Tensor], w: Tensor, lr: float,
                       inner_steps: int) -> Tensor:
    r"""Algorithm 1 of the paper (idealised, one mini-batch): the Neumann iterate ``m_K``.

    ``m₀ = −∇f(w)``; ``m_k = m_{k−1} − ∇f(w + η m_{k−1})`` for ``k = 1..K``. Each displaced
    gradient stands in for ``∇f(w) + η ∇²f m_{k−1}`` (no Hessian-vector product). On a quadratic
    ``f = ½wᵀAw − bᵀw`` it is exact Richardson iteration:
    ``η m_K = −(I − (I − ηA)^{K+1}) A⁻¹ ∇f(w)``, which tends to the Newton step when
    ``0 < ηλ(A) < 2``. The outer update is ``w ← w + η m_K``.
    """
    g0 = grad(w)
    m = -g0
    for _ in range(inner_steps):
        m = m - grad(w + lr * m)
    return m
