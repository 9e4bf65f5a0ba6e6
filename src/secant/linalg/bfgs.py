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

import math

import torch
from torch import Tensor

from secant.linalg.products import matvec


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
    # sᵀy > max(bound, 0); a comparison with NaN is false, and a non-finite ‖s‖² or scale makes
    # the bound ∞ or NaN (clamp keeps NaN): with sᵀy < ∞ that is every non-finite case
    return (sy > (eps * ss * scale).clamp(min=0)) & (sy < math.inf)


def rows_finite(*tensors: Tensor) -> Tensor:
    """``[L]`` bool: for each ``l``, every entry of every ``tensors[k][l]`` is finite (no host
    sync); :func:`all_finite` per index of the leading dimension."""
    flat = [t.reshape(t.shape[0], -1) for t in tensors]
    both = flat[0] * 0 if len(flat) == 1 else torch.cat(flat, 1).mul_(0)
    return both.sum(1) == 0


def bfgs_inverse_update_(h: Tensor, s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
    """In-place, masked BFGS update of ``H [n, n]`` by the pair ``s, y [n]``, or of a stack
    ``H [L, n, n]`` by the pairs ``s, y [L, n]`` (``accept`` 0-d or ``[L]``).

    The expanded form ``H⁺ = H + (sᵀy + yᵀHy) ssᵀ/(sᵀy)² − (Hy sᵀ + s yᵀH)/(sᵀy)`` written as
    ``H ← H + U C Uᵀ`` with ``U = [s, Hy]`` and
    ``C = [[(sᵀy + yᵀHy)/(sᵀy)², −1/sᵀy], [−1/sᵀy, 0]]`` — the same expanded form as a single
    rank-2 GEMM pass over ``H``, no temporaries of size ``n²``. Applied only where ``accept``
    (bool tensor, no host sync) and the coefficients and vectors are finite; otherwise ``H``
    is left bit-for-bit unchanged. Returns the final acceptance.

    Testing ``C`` tests the vectors too: a non-finite entry of ``s``, ``y`` or ``Hy`` makes
    ``sᵀy`` or ``yᵀHy`` non-finite (a product with ±inf or NaN is never finite, nor a sum
    with such a term), and then ``c11`` is NaN or ±inf, or ``c12 = −1/sᵀy`` is (``sᵀy = 0``).
    """
    hy = matvec(h, y)
    sy = (s * y).sum(-1)
    c11 = (sy + (y * hy).sum(-1)) / (sy * sy)
    c12 = -1.0 / sy
    c = torch.stack((c11, c12, c12, torch.zeros_like(c11)), -1)
    ok = accept & ((c * 0).sum(-1) == 0)
    mask = ok.unsqueeze(-1).unsqueeze(-1)
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    u = torch.where(mask, torch.stack((s, hy), dim=-1), zero)  # [..., n, 2]
    c = torch.where(mask, c.unflatten(-1, (2, 2)), zero)
    if h.dim() == 2:
        h.addmm_(u @ c, u.T)
    else:
        h.baddbmm_(torch.bmm(u, c), u.mT)
    return ok
