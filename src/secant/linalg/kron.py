"""Kronecker-factored curvature: applies, factored Tikhonov damping, inverses, KL-clipping.

A layer with weight matrix ``W̃ ∈ R^{d_out × d_in}`` (bias as the last column when there is one)
has a curvature block approximated by ``A ⊗ G`` (column-major ``vec``), ``A`` of size ``d_in``
(input side) and ``G`` of size ``d_out`` (pre-activation side). By the Kronecker identity
``(A ⊗ G) vec(X) = vec(G X Aᵀ)``, so with symmetric factors

    ``(A ⊗ G)⁻¹ vec(X) = vec(G⁻¹ X A⁻¹)``

(row-major flattening, as ``Tensor.reshape`` does, swaps the order: ``(G ⊗ A)``). Everything
here is pure tensor math on matrices, batched over leading dimensions where it makes sense.
Decompositions run in at least float32 (half inputs are promoted, results cast back). The math
and the numerical decisions are described in docs/kronecker.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factor decompositions run in: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def kron_apply(left: Tensor, x: Tensor, right: Tensor) -> Tensor:
    """``left · X · right`` for ``X [..., d_out, d_in]``: ``(rightᵀ ⊗ left) vec(X)`` column-major.

    With ``left = H_g`` and ``right = H_a`` (symmetric) this is the K-BFGS / K-FAC direction
    ``(H_a ⊗ H_g) vec(∇)``.
    """
    return left @ x @ right


def gram(x: Tensor, alpha: float, block: int = 192, ones: bool = False) -> Tensor:
    """``alpha · xᵀx`` for ``x [n, d]`` (a factor statistic), computed block by block; with
    ``ones`` the statistic of the homogeneous rows ``[x, 1]``: ``alpha · [[xᵀx, xᵀ1], [1ᵀx, n]]``
    (``[d + 1, d + 1]``) without building ``[x, 1]``.

    Up to ``block`` columns this is the plain product of ``[x, 1]`` (as fast for ``n`` = 100 and
    1000, ``d`` ≤ 192 on one CPU thread, and five ops). Wider, the columns are cut into equal
    blocks of at most ``block`` (sizes rounded up to a multiple
    of 8); only the blocks on and below the diagonal are multiplied (``b(b+1)/2`` of ``b²``) and
    the others are their transposes, so a wide factor costs about half the multiply-adds of
    ``xᵀx`` (measured ≈ 2× faster for ``d`` = 785…1001, ``n`` = 1000 on one CPU thread, where the
    plain product also pays a separate scaling pass). Keeping the column of ones out of the
    products keeps their sizes even: ≈ 15 % faster again for ``d`` = 784…1000
    (benchmarks/kronecker_speed.md).
    """
    d = x.shape[-1]
    if d <= block:  # one block: the plain product, [x, 1] built, as fast and fewer ops
        xa = torch.cat((x, x.new_ones(x.shape[0], 1)), 1) if ones else x
        return torch.mm(xa.T, xa).mul_(alpha)
    out = x.new_empty(d + ones, d + ones)
    if d:
        nb = math.ceil(d / block)
        size = math.ceil(math.ceil(d / nb) / 8) * 8
        edges = list(range(0, d, size)) + [d]
        spans = list(zip(edges[:-1], edges[1:]))
        for i, (a, b) in enumerate(spans):
            for c, e in spans[: i + 1]:
                blk = torch.addmm(out[a:b, c:e], x[:, a:b].T, x[:, c:e], beta=0, alpha=alpha)
                out[a:b, c:e] = blk
                if c != a:
                    out[c:e, a:b] = blk.T
    if ones:
        col = x.sum(0).mul_(alpha)
        out[:d, d] = col
        out[d, :d] = col
        out[d, d] = alpha * x.shape[0]
    return out


def factored_pi(a: Tensor, g: Tensor, eps: float = 1e-12) -> Tensor:
    """π of factored Tikhonov damping (Martens & Grosse 2015, §6.3).

    ``π = sqrt((tr A / dim A) / (tr G / dim G))``, the trace-norm choice that splits ``λ`` between
    the factors as ``(A + π√λ I) ⊗ (G + √λ/π I)``. Traces are clamped at ``eps`` so an all-zero
    factor gives a finite π. Batched over leading dimensions.
    """
    ta = a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=eps)
    tg = g.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=eps)
    return (ta / tg).sqrt()


def factored_shifts(a: Tensor, g: Tensor, damping: float, use_pi: bool = True
                    ) -> tuple[Tensor, Tensor]:
    """Diagonal shifts ``(π√λ, √λ/π)`` added to ``A`` and ``G``; π = 1 when ``use_pi`` is false.

    The product of the damped factors is
    ``A⊗G + √λ(π⁻¹ A⊗I + π I⊗G) + λ I`` — not ``A⊗G + λI``.
    """
    root = math.sqrt(damping)
    if use_pi:
        pi = factored_pi(a, g)
    else:
        pi = torch.ones(a.shape[:-2], dtype=a.dtype, device=a.device)
    return pi * root, root / pi


def damped_inverse(m: Tensor, shift: Tensor | float) -> Tensor:
    """``(M + shift·I)⁻¹`` of a symmetric PSD ``M [..., n, n]`` by Cholesky, in >= float32.

    ``shift`` is a float or a tensor broadcastable to ``M``'s batch shape. If the Cholesky
    factorisation fails (not positive definite in floating point) the result is NaN so callers
    can reject it without a host sync.
    """
    dt = compute_dtype(m.dtype)
    mm = m.to(dt)
    if isinstance(shift, Tensor):
        shift = shift.to(dt)[..., None, None]
    eye = torch.eye(m.shape[-1], dtype=dt, device=m.device)
    chol, info = torch.linalg.cholesky_ex(mm + shift * eye)
    inv = torch.cholesky_inverse(chol)
    bad = (info != 0)[..., None, None]
    inv = torch.where(bad, torch.full_like(inv, float("nan")), inv)
    return inv.to(m.dtype)


def sym_eigh(m: Tensor, floor: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Eigendecomposition ``M = Q diag(d) Qᵀ`` of a symmetric PSD matrix, in >= float32.

    Only the lower triangle of ``M`` is read. A zero diagonal entry of a PSD matrix means a zero
    row and column (a dead ReLU unit feeding the layer); many of them make a large cluster of
    zero eigenvalues on which LAPACK's float32 solver can fail to converge. Those diagonal
    entries are set to ``c = 2 tr M`` (above every eigenvalue) before the decomposition, which
    moves their eigenpairs ``(0, e_i)`` to ``(c, e_i)``, apart from all others; the ``k`` largest
    eigenvalues (``k`` = number of zero rows) are then set back to 0 (docs/kronecker.md,
    "Eigendecompositions"). Eigenvalues below ``floor`` are set to 0 (rounding noise of a PSD
    matrix, as the standard K-FAC code does) and eigenvector entries below the smallest normal
    float to 0 (subnormal entries make every later product with ``Q`` slow on CPUs). If LAPACK
    still fails to converge the decomposition is redone in float64, and if that fails too the
    result is NaN (callers reject it). Returns ``(d, Q)`` in the input dtype.
    """
    dt = compute_dtype(m.dtype)
    n = m.shape[-1]
    diag = m.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    trace = diag.sum(-1, keepdim=True)
    shift = dead * torch.where(trace > 0, 2 * trace, torch.ones_like(trace))
    moved = torch.arange(n, device=m.device) >= n - dead.sum(-1, keepdim=True)
    for attempt in (dt, torch.float64):
        try:
            d, q = torch.linalg.eigh((m + torch.diag_embed(shift)).to(attempt))
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        nan = float("nan")
        return torch.full(m.shape[:-1], nan, dtype=m.dtype, device=m.device), \
            torch.full_like(m, nan)
    d = d.to(m.dtype)
    q = q.to(m.dtype)
    d.masked_fill_(moved | (d < floor), 0.0)
    q.masked_fill_(q.abs() < torch.finfo(q.dtype).tiny, 0.0)
    return d, q


def eigen_inverse(d: Tensor, q: Tensor, shift: Tensor | float) -> Tensor:
    """``Q diag(1 / (d + shift)) Qᵀ = (M + shift·I)⁻¹`` from ``M``'s eigendecomposition."""
    if isinstance(shift, Tensor):
        shift = shift[..., None]
    return (q / (d + shift).unsqueeze(-2)) @ q.transpose(-1, -2)


def eigen_apply(q_g: Tensor, d_g: Tensor, x: Tensor, q_a: Tensor, d_a: Tensor,
                denom_shift: float | Tensor = 0.0, shift_g: Tensor | float = 0.0,
                shift_a: Tensor | float = 0.0) -> Tensor:
    """``Q_G [(Q_Gᵀ X Q_A) / D] Q_Aᵀ`` with ``D = (d_G + shift_g)(d_A + shift_a)ᵀ + denom_shift``.

    * ``denom_shift = λ``, shifts 0: exact Tikhonov ``(A⊗G + λI)⁻¹ vec X`` (the standard
      eigen K-FAC preconditioner).
    * ``shift_g = √λ/π``, ``shift_a = π√λ``: factored damping
      ``((A + π√λI) ⊗ (G + √λ/π I))⁻¹ vec X``.
    """
    if isinstance(shift_g, Tensor):
        shift_g = shift_g[..., None]
    if isinstance(shift_a, Tensor):
        shift_a = shift_a[..., None]
    if isinstance(denom_shift, Tensor):
        denom_shift = denom_shift[..., None, None]
    dg = d_g + shift_g
    da = d_a + shift_a
    denom = dg.unsqueeze(-1) * da.unsqueeze(-2) + denom_shift
    inner = q_g.transpose(-1, -2) @ x @ q_a
    return q_g @ (inner / denom) @ q_a.transpose(-1, -2)


def kl_clip_scale(grads: list[Tensor], directions: list[Tensor], lr: float, kappa: float
                  ) -> Tensor:
    """KL-clipping factor ν (Ba, Grosse & Martens 2017).

    ``ν = min(1, sqrt(κ / (η² Σ_l ⟨∇W_l, P_l⟩)))``; ν = 1 when the sum is not positive. After
    scaling, ``η² ν² Σ⟨∇W, P⟩ ≤ κ``. Returns a 0-d tensor (no host sync).
    """
    if not grads:
        return torch.ones(())
    vdot = torch.stack([(g * p).sum() for g, p in zip(grads, directions)]).sum()
    quad = vdot * (lr * lr)
    nu = torch.where(quad > 0, (kappa / quad.clamp(min=torch.finfo(quad.dtype).tiny)).sqrt(),
                     torch.ones_like(quad))
    return nu.clamp(max=1.0)
