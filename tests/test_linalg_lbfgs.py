"""Oracles O-M1, O-M2, O-M3, O-M7 (docs/momentum_lbfgs.md §9): the batched ring-buffer L-BFGS
against dense float64 BFGS matrices built independently, block by block."""

import pytest
import torch

from secant.linalg import (
    compact_apply,
    new_history,
    newest_gamma,
    push,
    two_loop,
)
from secant.optim.block_layout import BlockLayout

pytestmark = pytest.mark.usefixtures("float64_default")


def dense_bfgs(h, s, y):
    """Product form (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ."""
    rho = 1.0 / (s @ y)
    eye = torch.eye(len(s))
    left = eye - rho * torch.outer(s, y)
    return left @ h @ left.T + rho * torch.outer(s, s)


def dense_lbfgs_matrix(pairs, gamma):
    n = len(pairs[0][0]) if pairs else None
    h = gamma * torch.eye(n)
    for s, y in pairs:
        h = dense_bfgs(h, s, y)
    return h


def random_spd(n, gen, cond=100.0):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n)) @ q.T


class Blocks:
    """Per-block dense vectors <-> chunked [K, c] layout."""

    def __init__(self, sizes, chunk):
        self.sizes = sizes
        self.dummies = [torch.zeros(n) for n in sizes]
        self.layout = BlockLayout([[d] for d in self.dummies], chunk)

    def pack(self, vecs):
        buf = self.layout.new_buffer()
        for v, view in zip(vecs, self.layout.views(buf)):
            view.copy_(v)
        return buf

    def unpack(self, buf):
        return [v.clone() for v in self.layout.views(buf.contiguous())]

    def history(self, m):
        return new_history(self.layout.chunk_block, len(self.sizes), m, self.layout.shape[1],
                           torch.float64)


def fill(blocks, m, n_push, gen, reject_every=0):
    """Push n_push random SPD-consistent pairs; return history, per-block accepted pair lists."""
    mats = [random_spd(n, gen) for n in blocks.sizes]
    hist = blocks.history(m)
    kept = [[] for _ in blocks.sizes]
    for t in range(n_push):
        ss = [torch.randn(n, generator=gen) for n in blocks.sizes]
        ys = [a @ s for a, s in zip(mats, ss)]
        accept = torch.tensor([not (reject_every and (t + b) % reject_every == 0)
                               for b in range(len(blocks.sizes))])
        push(hist, blocks.pack(ss), blocks.pack(ys), accept)
        for b in range(len(blocks.sizes)):
            if accept[b]:
                kept[b] = (kept[b] + [(ss[b], ys[b])])[-m:]
    return hist, kept, mats


@pytest.mark.parametrize("apply", [compact_apply, two_loop])
@pytest.mark.parametrize("n_push,reject_every", [(0, 0), (3, 0), (9, 0), (11, 3)])
def test_history_apply_equals_dense_bfgs(apply, n_push, reject_every):
    """O-M1: two-loop and compact form both equal sequential dense BFGS from γI, per block,
    through ring overflow and per-block rejection."""
    gen = torch.Generator().manual_seed(n_push)
    blocks = Blocks([7, 13, 5], chunk=4)
    m = 4
    hist, kept, _ = fill(blocks, m, n_push, gen, reject_every)
    gamma = newest_gamma(hist)
    vs = [torch.randn(n, 3, generator=gen) for n in blocks.sizes]  # three right-hand sides
    v = torch.stack([blocks.pack([x[:, j] for x in vs]) for j in range(3)], dim=1)  # [K,3,c]
    out = apply(hist, v, gamma)
    for b, pairs in enumerate(kept):
        g_ref = (pairs[-1][0] @ pairs[-1][1]) / (pairs[-1][1] @ pairs[-1][1]) if pairs else 1.0
        assert gamma[b].item() == pytest.approx(float(g_ref), rel=1e-12)
        h = dense_lbfgs_matrix(pairs, g_ref) if pairs else torch.eye(blocks.sizes[b])
        for j in range(3):
            got = blocks.unpack(out[:, j])[b]
            torch.testing.assert_close(got, h @ vs[b][:, j], rtol=1e-10, atol=1e-10)
    assert hist.count.tolist() == [len(p) for p in kept]


def test_compact_equals_two_loop_float32():
    gen = torch.Generator().manual_seed(5)
    blocks = Blocks([40, 3, 64], chunk=16)
    hist, _, _ = fill(blocks, 5, 7, gen)
    hist = hist._replace(z=hist.z.float(), gram=hist.gram.float())
    v = torch.randn(hist.z.shape[0], 1, hist.z.shape[2], generator=gen).float()
    v = v * (blocks.pack([torch.ones(n) for n in blocks.sizes]).float().unsqueeze(1))
    g = newest_gamma(hist)
    torch.testing.assert_close(compact_apply(hist, v, g), two_loop(hist, v, g), rtol=1e-4,
                               atol=1e-5)


def test_secant_equation_and_descent():
    """O-M2: H y_newest = s_newest; vᵀHv > 0 for random v."""
    gen = torch.Generator().manual_seed(1)
    blocks = Blocks([9, 6], chunk=5)
    hist, kept, _ = fill(blocks, 3, 5, gen)
    y = blocks.pack([p[-1][1] for p in kept]).unsqueeze(1)
    s = blocks.pack([p[-1][0] for p in kept]).unsqueeze(1)
    hy = compact_apply(hist, y, newest_gamma(hist))
    torch.testing.assert_close(hy, s, rtol=1e-10, atol=1e-10)
    for _ in range(20):
        v = blocks.pack([torch.randn(n, generator=gen) for n in blocks.sizes]).unsqueeze(1)
        hv = compact_apply(hist, v, newest_gamma(hist))
        for a, b in zip(blocks.unpack(hv[:, 0]), blocks.unpack(v[:, 0])):
            assert (a @ b).item() > 0


def test_quadratic_termination_exact_line_search():
    """O-M3: with H₀ = I, exact line search and m ≥ n, L-BFGS reaches ∇f = 0 in n steps and
    H_n = A⁻¹."""
    gen = torch.Generator().manual_seed(2)
    n = 8
    a = random_spd(n, gen, cond=50.0)
    b = torch.randn(n, generator=gen)
    blocks = Blocks([n], chunk=n)
    hist = blocks.history(n)
    one = torch.ones(1)
    x = torch.randn(n, generator=gen)
    g = a @ x - b
    for _ in range(n):
        p = -compact_apply(hist, blocks.pack([g]).unsqueeze(1), one)[:, 0].reshape(-1)[:n]
        t = -(g @ p) / (p @ a @ p)
        x_new = x + t * p
        g_new = a @ x_new - b
        push(hist, blocks.pack([x_new - x]), blocks.pack([g_new - g]), torch.tensor([True]))
        x, g = x_new, g_new
    assert torch.linalg.vector_norm(g) < 1e-9 * torch.linalg.vector_norm(b)
    eye = blocks.pack([torch.eye(n)[:, 0]]).new_zeros(1, n, n)
    eye[0] = torch.eye(n)
    h_n = compact_apply(hist, eye, one)[0]
    torch.testing.assert_close(h_n, torch.linalg.inv(a), rtol=1e-8, atol=1e-8)


def test_eigenvector_pairs_give_exact_inverse_and_random_pairs_do_not():
    """O-M3 (simple form) with its negative control."""
    gen = torch.Generator().manual_seed(3)
    n = 6
    a = random_spd(n, gen)
    evals, evecs = torch.linalg.eigh(a)
    one = torch.ones(1)
    eye = torch.eye(n).unsqueeze(0)
    for pairs_from, expect_inverse in ((evecs.T, True), (torch.randn(n, n, generator=gen), False)):
        blocks = Blocks([n], chunk=n)
        hist = blocks.history(n)
        for s in pairs_from:
            push(hist, s.view(1, n), (a @ s).view(1, n), torch.tensor([True]))
        h = compact_apply(hist, eye, one)[0]
        err = torch.linalg.matrix_norm(h - torch.linalg.inv(a)) / torch.linalg.matrix_norm(h)
        assert (err < 1e-10) == expect_inverse


def test_scale_invariance():
    """O-M7: scaling every pair by c > 0 leaves H v unchanged under γ scaling."""
    gen = torch.Generator().manual_seed(4)
    blocks = Blocks([10, 4], chunk=3)
    hist, kept, _ = fill(blocks, 4, 6, gen)
    scaled = blocks.history(4)
    for ps in zip(*kept):
        push(scaled, blocks.pack([1e3 * p[0] for p in ps]), blocks.pack([1e3 * p[1] for p in ps]),
             torch.tensor([True, True]))
    v = blocks.pack([torch.randn(n, generator=gen) for n in blocks.sizes]).unsqueeze(1)
    for apply in (compact_apply, two_loop):
        torch.testing.assert_close(apply(scaled, v, newest_gamma(scaled)),
                                   apply(hist, v, newest_gamma(hist)), rtol=1e-10, atol=1e-12)


def test_layout_runs_cover_exactly_the_views_and_merge_back_to_back_parameters():
    """``BlockLayout.runs``: each run is the union of its parameters' views in the flat buffer
    (checked by storage offsets), parameters of one block merge into one run, a block's chunk
    padding or a skipped parameter splits runs; a buffer starting at a later chunk shifts
    them."""
    ps = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(7), torch.zeros(2, 2)]
    lay = BlockLayout([[ps[0], ps[1]], [ps[2]], [ps[3]]], chunk_size=64)
    buf = lay.new_buffer()
    offset = {id(p): v.storage_offset() for p, v in zip(lay.params, lay.views(buf))}
    for chosen in (ps, [ps[0], ps[2], ps[3]], [ps[1], ps[3]]):
        runs = lay.runs(chosen)
        assert [q for _, run in runs for q in run] == chosen
        for sl, run in runs:
            starts = [offset[id(q)] for q in run]
            assert sl.start == starts[0] and sl.stop == starts[-1] + run[-1].numel()
            assert sl.stop - sl.start == sum(q.numel() for q in run)  # back to back
    assert [len(run) for _, run in lay.runs(ps)] == [2, 1, 1]  # one run per block here
    chunk = lay.chunk_size
    shifted = lay.runs([ps[2]], first_chunk=1)
    assert shifted[0][0] == slice(offset[id(ps[2])] - chunk, offset[id(ps[2])] - chunk + 7)
