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


def growth_guard(g_norm: Tensor, avg: Tensor, growth: float,
                 decay: float) -> tuple[Tensor, Tensor]:
    r"""Scale for the gradient so that its norm is at most ``growth`` times the running average
    of the (scaled) gradient norms before it, and that average updated::

        s    = min(1, growth · ā / ‖g‖)        (s = 1 while ā = 0: nothing seen yet)
        ā'   = decay · ā + (1 − decay) · s‖g‖   (ā' = ‖g‖ at the first step)

    A run past its stable step length shows itself as a gradient norm that grows
    geometrically from one step to the next; the guard turns that growth into at most a
    factor ``growth`` over the average, which itself can rise by ``(1 − decay)(growth − 1)``
    per step (10 % with growth 2, decay 0.9), so a gradient norm that rises for real is
    followed within tens of steps. Non-finite ``‖g‖`` leaves ``ā`` unchanged. No host sync.
    """
    seen = avg > 0
    finite = torch.isfinite(g_norm)
    cap = growth * avg
    scale = torch.where(seen & finite & (g_norm > cap), cap / torch.where(g_norm > 0, g_norm, 1.0),
                        1.0)
    kept = scale * g_norm
    new = torch.where(seen, decay * avg + (1.0 - decay) * kept, kept)
    return scale, torch.where(finite, new, avg)
