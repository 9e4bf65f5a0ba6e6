"""Dense BFGS update of an inverse-Hessian approximation, and the cautious skip test.

``H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`` with ``ρ = 1 / sᵀy`` (Nocedal & Wright eq. 6.17).
``H⁺`` satisfies the secant equation ``H⁺ y = s``, stays symmetric, and stays positive
definite if ``H`` is and ``sᵀy > 0``. Batched over leading dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bfgs_inverse_update(h: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """Return ``H⁺`` for ``H [..., n, n]`` and the pair ``s, y [..., n]``.

    Uses the expanded form ``H + (sᵀy + yᵀHy) ssᵀ/(sᵀy)² − (Hy sᵀ + s yᵀH)/(sᵀy)``: two rank-one
    outer products and one matrix-vector product, ``O(n²)``.
    """
    hy = (h @ y.unsqueeze(-1)).squeeze(-1)
    sy = (s * y).sum(-1, keepdim=True)
    yhy = (y * hy).sum(-1, keepdim=True)
    ss = s.unsqueeze(-1) * s.unsqueeze(-2)
    cross = hy.unsqueeze(-1) * s.unsqueeze(-2)
    coef = ((sy + yhy) / sy**2).unsqueeze(-1)
    return h + coef * ss - (cross + cross.transpose(-1, -2)) / sy.unsqueeze(-1)


def cautious_accept(s: Tensor, y: Tensor, scale: Tensor, eps: float = 1e-4) -> Tensor:
    """Cautious-update test: accept only if ``sᵀy > eps · ‖s‖² · scale`` and all is finite.

    K-BFGS uses ``scale = ‖mean gradient‖`` (Li & Fukushima 2001 style). Rejected pairs leave
    ``H`` unchanged.
    """
    sy = (s * y).sum(-1)
    ss = (s * s).sum(-1)
    finite = torch.isfinite(sy) & torch.isfinite(ss) & torch.isfinite(scale)
    return finite & (sy > 0) & (sy > eps * ss * scale)
