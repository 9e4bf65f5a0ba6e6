"""Curvature-pair damping rules.

* :func:`tau_coefficient` — the mL-BFGS rule (Niu et al., TMLR 2023; docs/momentum_lbfgs.md §2):
  the weight τ that mixes ``s`` into ``y`` so the curvature ratio ``r̂ = sᵀŷ / sᵀs`` lies in
  ``[σ_L, σ_H]``; it takes the inner products, so callers may compute them per block.
* :func:`powell_damping` — Powell's rule (Powell 1978; Nocedal & Wright Proc. 18.2), written for a
  generic pair so that both the classical form on ``B`` and the form on ``H`` used by the double
  damping of K-BFGS (Goldfarb, Ren & Bahamou 2020) are one function.

They broadcast over leading (batch) dimensions; vectors lie on the last dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tau_coefficient(
    sy: Tensor, ss: Tensor, sigma_low: float, sigma_high: float, tau_max: float
) -> tuple[Tensor, Tensor]:
    """Mixing weight ``τ`` of the mL-BFGS damping, from ``sᵀy`` and ``sᵀs``.

    With ``r = sᵀy / sᵀs``::

        τ = (1 − σ_L) / (1 − r)   if r < σ_L
        τ = (σ_H − 1) / (r − 1)   if r > σ_H
        τ = 1                      otherwise,   then τ ← min(τ, τ_max)

    so that ``ŷ = τ y + (1 − τ) s`` has ``r̂ = 1 − τ (1 − r) ∈ [σ_L, σ_H]`` (requires
    ``σ_L < 1 < σ_H``). Returns ``(τ, active)`` where ``active`` marks the pairs the bounds
    changed: ratio out of bounds *and* a bound's ``τ`` below ``τ_max`` (a ratio just under
    ``σ_L`` can need a ``τ`` above the cap, and then gets the same ``ŷ`` as an in-bounds pair).
    Non-finite ratios give a non-finite ``τ``; callers reject such pairs.
    """
    r = sy / ss
    low = r < sigma_low
    high = r > sigma_high
    one = torch.ones_like(r)
    tau = torch.where(low, (1.0 - sigma_low) / torch.where(low, 1.0 - r, one), one)
    tau = torch.where(high, (sigma_high - 1.0) / torch.where(high, r - 1.0, one), tau)
    active = (low | high) & (tau < tau_max)
    tau = torch.where(torch.isfinite(r), tau.clamp(max=tau_max), r)
    return tau, active


def _powell(u: Tensor, w: Tensor, mu_vec: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """:func:`powell_damping` and where it was active (``[...]`` bool)."""
    uw = (u * w).sum(-1, keepdim=True)
    umu = (u * mu_vec).sum(-1, keepdim=True)
    active = uw < mu * umu
    # (where it is not active, the quotient may be anything, ±inf or NaN included: not taken)
    theta = torch.where(active, (1.0 - mu) * umu / (umu - uw), 1.0)
    return torch.lerp(mu_vec, w, theta), active.squeeze(-1)


def powell_damping(u: Tensor, w: Tensor, mu_vec: Tensor, mu: float) -> Tensor:
    """Powell damping of ``w`` against ``u`` under the metric ``M`` (``mu_vec = M u``).

    If ``uᵀw < μ uᵀMu``: ``θ = (1 − μ) uᵀMu / (uᵀMu − uᵀw)`` and ``w̃ = θ w + (1 − θ) M u``, which
    gives ``uᵀw̃ = μ uᵀMu`` exactly; otherwise ``w̃ = w``.

    * Classical form on ``B`` (damps ``y``): ``powell_damping(s, y, B s, μ)``.
    * Form on ``H`` (damps ``s``): ``powell_damping(y, s, H y, μ)``.
    """
    return _powell(u, w, mu_vec, mu)[0]


def double_damping(
    s: Tensor, y: Tensor, hy: Tensor, mu1: float, mu2: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Double damping (DD) of K-BFGS: Powell on ``H`` (``s``), then Powell with ``B = I`` (``y``).

    ``hy = H y`` for the current inverse approximation ``H``. Afterwards
    ``s̃ᵀỹ ≥ μ2 ‖s̃‖²`` (equality when step 2 is active), so the BFGS update keeps ``H`` positive
    definite. Paper constants: ``μ1 = 0.2``, ``μ2 = √λ``. Returns ``(s̃, ỹ, step1, step2)``, the
    last two where each step was active (``sᵀy < μ1 yᵀHy``, ``s̃ᵀy < μ2 s̃ᵀs̃``; bool, one per
    pair).
    """
    s_tilde, step1 = _powell(y, s, hy, mu1)
    y_tilde, step2 = _powell(s_tilde, y, s_tilde, mu2)
    return s_tilde, y_tilde, step1, step2
