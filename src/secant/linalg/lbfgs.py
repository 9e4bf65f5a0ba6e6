"""L-BFGS histories for many blocks at once, stored as stacked ring buffers.

Layout
------
A vector that spans ``B`` independent blocks (the diagonal blocks of a block-diagonal inverse
Hessian approximation) is stored as ``[K, c]``: ``K`` chunks of ``c`` entries, each chunk owned by
exactly one block (``chunk_block[k]``), blocks zero-padded to whole chunks. A history of ``m``
pairs is one tensor ``z`` of shape ``[K, 2m, c]``: rows ``0..m-1`` hold the ``s`` vectors and rows
``m..2m-1`` the ``y`` vectors of each ring slot. Every product with the history is then a single
batched matmul over chunks followed by a small per-block reduction, so all blocks are handled
by the same few kernels whatever their number or sizes.

Right-hand sides are ``v`` of shape ``[K, r, c]`` (``r`` vectors at once; ``r = 1`` for a
gradient, ``r = d_in + 1`` for the columns of a Kronecker factor's matrix argument).

The per-block Gram matrix ``gram = Zᵀ Z`` (``[B, 2m, 2m]``) is kept up to date on every push,
so the compact form needs no extra pass over the history.

A block may span processes (FSDP2: each rank holds some rows of every block). Every quantity
that sums over a block's rows then goes through the history's ``reduce`` (an all-reduce over
those ranks): the per-block sums of :func:`push`, :func:`compact_apply` and :func:`two_loop`,
which are the only places these three sum over rows. Everything else is per-block and small,
so it is computed identically on every rank. (:func:`dense_inverse`, which multiplies a whole
block out, takes no ``reduce``.) Slot ``head[b]`` is the next one to
be written (the oldest pair once the ring is full); ``count[b]`` pairs are valid. Empty slots
hold zeros.

Both application routines compute ``H v`` for the L-BFGS inverse-Hessian approximation built from
``H₀ = γ I`` and the valid pairs, oldest to newest:

* :func:`two_loop` — the classic two-loop recursion (Nocedal 1980), ``2m`` sequential passes.
* :func:`compact_apply` — the compact representation of Byrd, Nocedal & Schnabel (1994),
  ``H = γI + [S, γY] M [S, γY]ᵀ`` with
  ``M = [[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]]``, ``R = triu(SᵀY)``, ``D = diag(SᵀY)``:
  two passes over the history (projection and reconstruction) plus ``m×m`` triangular solves.

:func:`dense_inverse` returns that ``H`` itself as a dense matrix per block (one chunk per
block), for a caller that multiplies by the same ``H`` more than once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class History(NamedTuple):
    """Ring-buffer L-BFGS history of ``m`` pairs for ``B`` blocks laid out in ``K`` chunks."""

    z: Tensor  # [K, 2m, c]: s vectors in rows 0..m-1, y vectors in rows m..2m-1
    gram: Tensor  # [B, 2m, 2m]: per-block Zᵀ Z
    head: Tensor  # [B] int64: next slot to write
    count: Tensor  # [B] int64: number of valid pairs
    chunk_block: Tensor  # [K] int64: owning block of each chunk
    reduce: Callable[[Tensor], Tensor] | None = None  # sums [B, ...] over ranks (FSDP2)

    @property
    def size(self) -> int:
        """History capacity ``m``."""
        return self.z.shape[1] // 2

    @property
    def num_blocks(self) -> int:
        return self.gram.shape[0]


def new_history(
    chunk_block: Tensor,
    num_blocks: int,
    history_size: int,
    chunk_size: int,
    dtype: torch.dtype = torch.float32,
) -> History:
    """An empty history (all slots zero) on ``chunk_block``'s device."""
    if history_size < 1:
        raise ValueError(f"history_size={history_size} must be >= 1")
    device = chunk_block.device
    m = history_size
    return History(
        z=torch.zeros(chunk_block.numel(), 2 * m, chunk_size, dtype=dtype, device=device),
        gram=torch.zeros(num_blocks, 2 * m, 2 * m, dtype=dtype, device=device),
        head=torch.zeros(num_blocks, dtype=torch.long, device=device),
        count=torch.zeros(num_blocks, dtype=torch.long, device=device),
        chunk_block=chunk_block,
    )


def block_sum(x: Tensor, chunk_block: Tensor, num_blocks: int) -> Tensor:
    """Sum per-chunk quantities ``x[K, ...]`` into per-block ones ``[B, ...]``."""
    out = x.new_zeros((num_blocks, *x.shape[1:]))
    return out.index_add_(0, chunk_block, x)


def block_dot(a: Tensor, b: Tensor, chunk_block: Tensor, num_blocks: int) -> Tensor:
    """Per-block inner products of two chunked vectors ``[K, c]`` -> ``[B]``."""
    return block_sum((a * b).sum(-1), chunk_block, num_blocks)


def _block_total(h: History, x: Tensor) -> Tensor:
    """:func:`block_sum` of per-chunk ``x`` over the whole of each block (all ranks)."""
    out = block_sum(x, h.chunk_block, h.num_blocks)
    return out if h.reduce is None else h.reduce(out)


def _slot_rows(h: History, slot: Tensor) -> Tensor:
    """Per-chunk row index of per-block slot ``slot[B]``."""
    return slot[h.chunk_block]


def newest_pair(h: History) -> tuple[Tensor, Tensor]:
    """The newest stored ``(s, y)`` of every block as chunked vectors ``[K, c]`` (zeros if none)."""
    m = h.size
    rows = _slot_rows(h, (h.head - 1) % m)
    k = torch.arange(h.z.shape[0], device=h.z.device)
    return h.z[k, rows], h.z[k, rows + m]


def push(h: History, s: Tensor, y: Tensor, accept: Tensor) -> None:
    """Append the pair ``(s, y)`` (chunked ``[K, c]``) in place to every block where ``accept[b]``.

    A full ring evicts its oldest pair. Rejected blocks keep their history unchanged.
    """
    m = h.size
    K = h.z.shape[0]
    k = torch.arange(K, device=h.z.device)
    rows = _slot_rows(h, h.head)
    take = accept[h.chunk_block].unsqueeze(-1)
    new_s = torch.where(take, s, h.z[k, rows])
    new_y = torch.where(take, y, h.z[k, rows + m])
    h.z[k, rows] = new_s
    h.z[k, rows + m] = new_y
    # Gram columns of the (possibly) rewritten slot, for every block.
    new = torch.stack((new_s, new_y), dim=1)  # [K, 2, c]
    # Z times the two columns, multiplied as rows (secant.linalg.products)
    cols = _block_total(h, torch.bmm(new, h.z.mT).mT)  # [B, 2m, 2]
    b = torch.arange(h.num_blocks, device=h.z.device)
    keep = accept.unsqueeze(1)
    for j, idx in enumerate((h.head, h.head + m)):  # a rejected block's Gram stays untouched
        col = torch.where(keep, cols[:, :, j], h.gram[b, :, idx])
        h.gram[b, :, idx] = col
        h.gram[b, idx, :] = col
    h.head.copy_(torch.where(accept, (h.head + 1) % m, h.head))
    h.count.copy_(torch.where(accept, (h.count + 1).clamp(max=m), h.count))


def newest_gamma(h: History, eps: float = 0.0) -> Tensor:
    """Standard scaling ``γ = sᵀy / (yᵀy + eps)`` of each block's newest pair; 1 where a block
    is empty."""
    m = h.size
    j = (h.head - 1) % m
    b = torch.arange(h.num_blocks, device=h.z.device)
    sy = h.gram[b, j, j + m]
    yy = h.gram[b, j + m, j + m] + eps
    return torch.where(h.count > 0, sy / torch.where(h.count > 0, yy, 1.0), 1.0)


def _chronology(h: History) -> tuple[Tensor, Tensor]:
    """Slots in age order (oldest first) and their validity, both ``[B, m]``.

    Empty slots come first; they hold zeros and so never couple to valid ones.
    """
    m = h.size
    pos = torch.arange(m, device=h.z.device)
    order = (h.head.unsqueeze(1) + pos) % m
    valid = pos.unsqueeze(0) >= (m - h.count).unsqueeze(1)
    return order, valid


def _project(h: History, v: Tensor) -> Tensor:
    """Per-block products ``[Sᵀ v, Yᵀ v]`` for ``v [K, r, c]`` -> ``[B, r, 2m]``."""
    return _block_total(h, torch.bmm(v, h.z.transpose(1, 2)))


def _reconstruct(h: History, v: Tensor, gamma: Tensor, coef: Tensor) -> Tensor:
    """``γ v + Z-combination`` with per-block, per-slot coefficients ``coef [B, r, 2m]``."""
    g = gamma[h.chunk_block].view(-1, 1, 1)
    return torch.baddbmm(g * v, coef[h.chunk_block], h.z)


def compact_apply(h: History, v: Tensor, gamma: Tensor) -> Tensor:
    """``H v`` by the compact (Byrd–Nocedal–Schnabel) form; ``v [K, r, c]``, ``gamma [B]``.

    ``Hv = γ v + S p − γ Y q`` with ``q = R⁻¹ Sᵀv`` and ``p = R⁻ᵀ (D q + γ YᵀY q − γ Yᵀv)``.
    Empty blocks return ``γ v``.
    """
    m = h.size
    order, valid = _chronology(h)
    proj = _project(h, v)  # [B, r, 2m]
    idx_r = order.unsqueeze(1).expand(-1, v.shape[1], -1)
    u_s = proj[..., :m].gather(2, idx_r).transpose(1, 2)  # [B, m, r] chronological
    u_y = proj[..., m:].gather(2, idx_r).transpose(1, 2)
    rows = order.unsqueeze(2).expand(-1, -1, m)
    cols = order.unsqueeze(1).expand(-1, m, -1)
    sy = h.gram[:, :m, m:].gather(1, rows).gather(2, cols)  # s_i·y_j, chronological
    yy = h.gram[:, m:, m:].gather(1, rows).gather(2, cols)
    d = torch.where(valid, sy.diagonal(dim1=1, dim2=2), 0.0)
    r_mat = sy.triu(1) * (valid.unsqueeze(1) & valid.unsqueeze(2)) + torch.diag_embed(
        torch.where(valid, d, 1.0)
    )
    g = gamma.view(-1, 1, 1)
    q = torch.linalg.solve_triangular(r_mat, u_s, upper=True)
    t = d.unsqueeze(2) * q + g * (yy @ q) - g * u_y
    p = torch.linalg.solve_triangular(r_mat.transpose(1, 2), t, upper=False)
    coef = torch.zeros_like(proj)  # [B, r, 2m]
    coef.scatter_(2, idx_r, p.transpose(1, 2))
    coef.scatter_(2, idx_r + m, (-g * q).transpose(1, 2))
    return _reconstruct(h, v, gamma, coef)


def dense_inverse(h: History, gamma: Tensor) -> Tensor:
    """The ``H`` of :func:`compact_apply` of every block as a dense ``[B, c, c]`` matrix, for
    histories with one chunk per block (``chunk_block = arange(B)``); ``gamma [B]``.

    The compact form multiplied out: with ``S``, ``Y`` the pairs as columns in age order and
    ``R``, ``D`` as in :func:`compact_apply`, ``W = R⁻¹ Sᵀ`` (one triangular solve with ``c``
    right-hand sides) and

        ``H = γ I + Wᵀ (D + γ YᵀY) W − γ (Y W + (Y W)ᵀ)``,

    which is ``compact_apply`` of ``I`` (``q = W``, ``S p = Wᵀ (D + γYᵀY) W − γ Wᵀ Yᵀ``)
    without its projection of ``I`` and second solve. ``SᵀY`` and ``YᵀY`` are read from
    ``gram`` in age order (for ``c = 64``, ``m = 100``, six blocks: 113 µs against 185 µs for
    the product of the history on one CPU thread); empty slots hold zeros, so their rows of
    ``R`` are those of ``I`` with no masking. Empty blocks return ``γ I``.
    """
    m = h.size
    order, valid = _chronology(h)
    b, _, c = h.z.shape
    both = torch.cat((order, order + m), 1)  # [B, 2m]: the s slots, then the y slots, by age
    rows = (both + 2 * m * torch.arange(b, device=both.device).unsqueeze(1)).flatten()
    z = h.z.reshape(b * 2 * m, c).index_select(0, rows).view(b, 2 * m, c)  # chronological
    s, y = z[:, :m], z[:, m:]
    by_age = h.gram.reshape(b * 2 * m, 2 * m).index_select(0, rows).view(b, 2 * m, 2 * m)
    zy = by_age.gather(2, (order + m).unsqueeze(1).expand(b, 2 * m, m))  # s_i·y_j, y_i·y_j
    sy, yy = zy[:, :m], zy[:, m:]
    d = sy.diagonal(dim1=1, dim2=2)
    r_mat = sy.triu(1) + torch.diag_embed(d + ~valid)
    g = gamma.view(-1, 1, 1)
    # W = R⁻¹ Sᵀ, solved as Wᵀ Rᵀ = S (the layout LAPACK takes without copies: ≈ 2× faster)
    w = torch.linalg.solve_triangular(r_mat.transpose(1, 2), s.transpose(1, 2), upper=False,
                                      left=False).transpose(1, 2)  # [B, m, c]
    yw = y.transpose(1, 2) @ w  # [B, c, c]
    eye = torch.eye(c, dtype=z.dtype, device=z.device)
    return torch.baddbmm(g * (eye - yw - yw.transpose(1, 2)), w.transpose(1, 2),
                         d.unsqueeze(2) * w + g * (yy @ w))


def two_loop(h: History, v: Tensor, gamma: Tensor) -> Tensor:
    """``H v`` by the two-loop recursion; same arguments and result as :func:`compact_apply`."""
    m = h.size
    order, valid = _chronology(h)
    K = h.z.shape[0]
    k = torch.arange(K, device=h.z.device)
    b = torch.arange(h.num_blocks, device=h.z.device)
    q = v.clone()
    alphas: list[Tensor] = []
    rhos: list[Tensor] = []
    for i in reversed(range(m)):  # newest -> oldest
        slot = order[:, i]
        sy = h.gram[b, slot, slot + m]
        rho = torch.where(valid[:, i], 1.0 / torch.where(valid[:, i], sy, 1.0), 0.0)
        s = h.z[k, slot[h.chunk_block]].unsqueeze(-1)  # [K, c, 1]
        y = h.z[k, slot[h.chunk_block] + m].unsqueeze(1)  # [K, 1, c]
        a = rho.unsqueeze(1) * _block_total(h, torch.bmm(q, s).squeeze(-1))
        q = q - a[h.chunk_block].unsqueeze(-1) * y
        alphas.append(a)
        rhos.append(rho)
    r = gamma[h.chunk_block].view(-1, 1, 1) * q
    for i in range(m):  # oldest -> newest
        slot = order[:, i]
        a, rho = alphas[m - 1 - i], rhos[m - 1 - i]
        s = h.z[k, slot[h.chunk_block]].unsqueeze(1)
        y = h.z[k, slot[h.chunk_block] + m].unsqueeze(-1)
        beta = rho.unsqueeze(1) * _block_total(h, torch.bmm(r, y).squeeze(-1))
        r = r + (a - beta)[h.chunk_block].unsqueeze(-1) * s
    return r


def pair_spectrum(h: History) -> tuple[Tensor, Tensor, Tensor]:
    """What each block's stored pairs say about the curvature, ``[B]`` each (NaN where empty).

    The smallest and largest Rayleigh quotient ``sᵢᵀyᵢ / sᵢᵀsᵢ`` of the pairs (on a quadratic
    with ``y = A s``: values inside ``A``'s spectrum, along the directions stepped), and the
    participation ratio ``(Σλ)² / Σλ²`` of the eigenvalues ``λ`` of the pairs' cosine matrix
    ``cos(sᵢ, sⱼ)``: the effective number of independent directions the ``s`` vectors span
    (1 when all are parallel, the pair count when they are orthogonal).
    """
    m = h.size
    order, valid = _chronology(h)
    slot_valid = torch.zeros_like(valid).scatter_(1, order, valid)  # [B, m] by slot
    idx = torch.arange(m, device=h.z.device)
    ss = h.gram[:, idx, idx]
    rq = h.gram[:, idx, idx + m] / torch.where(slot_valid, ss, 1.0)
    inf = torch.full_like(rq, math.inf)
    lo = torch.where(slot_valid, rq, inf).amin(1)
    hi = torch.where(slot_valid, rq, -inf).amax(1)
    scale = torch.where(slot_valid, ss, 1.0).rsqrt()
    both = slot_valid.unsqueeze(1) & slot_valid.unsqueeze(2)
    cos = torch.where(both, h.gram[:, :m, :m] * scale.unsqueeze(1) * scale.unsqueeze(2), 0.0)
    lam = torch.linalg.eigvalsh(cos.double()).clamp(min=0.0)
    span = (lam.sum(1) ** 2 / (lam**2).sum(1).clamp(min=1e-300)).to(rq.dtype)
    nan = torch.full_like(lo, math.nan)
    empty = h.count == 0
    return (torch.where(empty, nan, lo), torch.where(empty, nan, hi),
            torch.where(empty, nan, span))
