"""Dense BFGS update of an inverse-Hessian approximation, and the cautious skip test.

``H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`` with ``ρ = 1 / sᵀy`` (Nocedal & Wright eq. 6.17).
``H⁺`` satisfies the secant equation ``H⁺ y = s``, stays symmetric, and stays positive
definite if ``H`` is and ``sᵀy > 0``. Batched over leading dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cautious_accept(s: Tensor, y: Tensor, scale: Tensor, eps: float = 1e-4) -> Tensor:
    """Cautious-update test: accept only if ``sᵀy > eps · ‖s‖² · scale`` and all is finite.

    K-BFGS uses ``scale = ‖mean gradient‖`` (Li & Fukushima 2001 style). Rejected pairs leave
    ``H`` unchanged.
    """
    sy = (s * y).sum(-1)
    ss = (s * s).sum(-1)
    finite = torch.isfinite(sy) & torch.isfinite(ss) & torch.isfinite(scale)
    return finite & (sy > 0) & (sy > eps * ss * scale)


def bfgs_inverse_update_(h: Tensor, s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
    """In-place, masked BFGS update of one matrix ``H [n, n]`` by the pair ``s, y [n]``.

    The expanded form ``H⁺ = H + (sᵀy + yᵀHy) ssᵀ/(sᵀy)² − (Hy sᵀ + s yᵀH)/(sᵀy)`` written as
    ``H ← H + U C Uᵀ`` with ``U = [s, Hy]`` and
    ``C = [[(sᵀy + yᵀHy)/(sᵀy)², −1/sᵀy], [−1/sᵀy, 0]]`` — the same expanded form as a single
    rank-2 GEMM pass over ``H``, no temporaries of size ``n²``. Applied only where ``accept``
    (0-d bool tensor, no host sync) and the coefficients and vectors are finite; otherwise ``H``
    is left bit-for-bit unchanged. Returns the final acceptance.
    """
    hy = h @ y
    sy = s @ y
    c11 = (sy + y @ hy) / (sy * sy)
    c12 = -1.0 / sy
    ok = (accept & torch.isfinite(c11) & torch.isfinite(c12) & torch.isfinite(s).all()
          & torch.isfinite(hy).all())
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    u = torch.where(ok, torch.stack((s, hy), dim=1), zero)  # [n, 2]
    c = torch.where(ok, torch.stack((torch.stack((c11, c12)), torch.stack((c12, zero)))), zero)
    h.addmm_(u @ c, u.T)
    return ok
