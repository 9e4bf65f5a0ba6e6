"""Dense BFGS update of an inverse-Hessian approximation, the cautious skip test, and the one-flag
finiteness test they and K-BFGS use.

``H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`` with ``ρ = 1 / sᵀy`` (Nocedal & Wright eq. 6.17).
``H⁺`` satisfies the secant equation ``H⁺ y = s``, stays symmetric, and stays positive
definite if ``H`` is and ``sᵀy > 0``. Batched over leading dimensions.

Finiteness without host syncs: ``0·x`` is 0 for a finite ``x`` and NaN for ±inf / NaN, so a sum
of ``0·x`` over any set of entries is 0 iff all of them are finite — one multiply and one sum
(never overflowing, unlike a plain sum), where ``torch.isfinite(x).all()`` dispatches four
element-wise ops and a reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor


def all_finite(*tensors: Tensor) -> Tensor:
    """One 0-d bool tensor: every entry of every tensor is finite (no host sync).

    ``Σ 0·x == 0`` over the entries (several tensors are concatenated first: one multiply and
    one sum in all, and a copy). A Gram matrix is finite iff its diagonal is
    (``|A_ij| ≤ √(A_ii A_jj)``): pass ``A.diagonal()`` to read ``d`` entries instead of ``d²``.
    """
    if len(tensors) == 1:
        return (tensors[0] * 0).sum() == 0
    return torch.cat([t.flatten() for t in tensors]).mul_(0).sum() == 0


def cautious_accept(s: Tensor, y: Tensor, scale: Tensor, eps: float = 1e-4) -> Tensor:
    """Cautious-update test: accept only if ``sᵀy > eps · ‖s‖² · scale`` and all is finite.

    K-BFGS uses ``scale = ‖mean gradient‖`` (Li & Fukushima 2001 style). Rejected pairs leave
    ``H`` unchanged.
    """
    sy = (s * y).sum(-1)
    ss = (s * s).sum(-1)
    finite = (sy * 0 + ss * 0 + scale * 0) == 0  # element-wise: sy, ss and scale finite
    return finite & (sy > 0) & (sy > eps * ss * scale)


def bfgs_inverse_update_(h: Tensor, s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
    """In-place, masked BFGS update of one matrix ``H [n, n]`` by the pair ``s, y [n]``.

    The expanded form ``H⁺ = H + (sᵀy + yᵀHy) ssᵀ/(sᵀy)² − (Hy sᵀ + s yᵀH)/(sᵀy)`` written as
    ``H ← H + U C Uᵀ`` with ``U = [s, Hy]`` and
    ``C = [[(sᵀy + yᵀHy)/(sᵀy)², −1/sᵀy], [−1/sᵀy, 0]]`` — the same expanded form as a single
    rank-2 GEMM pass over ``H``, no temporaries of size ``n²``. Applied only where ``accept``
    (0-d bool tensor, no host sync) and the coefficients and vectors are finite; otherwise ``H``
    is left bit-for-bit unchanged. Returns the final acceptance.

    Testing ``C`` tests the vectors too: a non-finite entry of ``s``, ``y`` or ``Hy`` makes
    ``sᵀy`` or ``yᵀHy`` non-finite (a product with ±inf or NaN is never finite, nor a sum
    with such a term), and then ``c11`` is NaN or ±inf, or ``c12 = −1/sᵀy`` is (``sᵀy = 0``).
    """
    hy = h @ y
    sy = s @ y
    c11 = (sy + y @ hy) / (sy * sy)
    c12 = -1.0 / sy
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    c = torch.stack((c11, c12, c12, zero)).view(2, 2)
    ok = accept & all_finite(c)
    u = torch.where(ok, torch.stack((s, hy), dim=1), zero)  # [n, 2]
    h.addmm_(u @ torch.where(ok, c, zero), u.T)
    return ok
