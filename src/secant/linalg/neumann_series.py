"""Pure pieces of the Neumann optimizer (Krishnan, Xiao & Saurous, ICLR 2018, arXiv 1712.03298).

No optimizer state here: the μ schedule and the regulariser coefficient, in the paper's form
and in the bounded form that is the library default (docs/neumann.md).
"""

from __future__ import annotations

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


def regulariser_coefficient(r_norm: Tensor, alpha: float, beta: float, eps: float) -> Tensor:
    r"""Coefficient ``c`` with ``∇_w[(α/3)‖r‖³ + β/‖r‖] = c · r``, ``r = w − v`` (v held fixed).

    ``c = (α‖r‖² − β/‖r‖²) / ‖r‖ = α‖r‖ − β/‖r‖³`` (paper §3.2). ``beta`` here is the effective
    weight (Table 1: 1e-5 × number of parameters). Guard: ``c = 0`` where ``‖r‖ ≤ eps``, so
    ``w = v`` gives no NaN; no host sync.
    """
    ok = r_norm > eps
    safe = torch.where(ok, r_norm, torch.ones_like(r_norm))
    return torch.where(ok, alpha * safe - beta / safe**3, torch.zeros_like(r_norm))


def bounded_regulariser_coefficient(r_norm: Tensor, g_norm: Tensor, alpha: float, beta: float,
                                    eps: float, ratio: float) -> Tensor:
    r"""The paper's coefficient ``c`` (:func:`regulariser_coefficient`) scaled down so that the
    regulariser's gradient ``c · r`` is never longer than ``ratio · ‖g‖``::

        c_b = c · min(1, ratio ‖g‖ / (|c| ‖r‖))          (c_b = 0 where c = 0)

    so ``‖c_b r‖ = min(|c| ‖r‖, ratio ‖g‖)``: the regulariser moves the weights by at most
    ``ratio · η‖g‖`` per step, a fraction of the gradient step, whatever ‖r‖, η or gradient
    clipping do. Where the paper's term is already that short it is unchanged. No host sync.
    """
    c = regulariser_coefficient(r_norm, alpha, beta, eps)
    length = c.abs() * r_norm
    cap = ratio * g_norm.to(length.dtype)
    scale = torch.where(length > cap, cap / torch.where(length > cap, length, 1.0), 1.0)
    return c * scale
