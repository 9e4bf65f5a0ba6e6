"""secant.linalg.kron (docs/kronecker.md) against dense float64 Kronecker matrices built with
torch.kron: the Kronecker identity, factored vs exact damping, the eigen paths, KL-clipping,
and the eigendecomposition's retry and subnormal flush."""

import math

import pytest
import torch

from secant.linalg.kron import (
    damped_inverse,
    eigen_apply,
    eigen_inverse,
    factored_pi,
    factored_shifts,
    gram,
    kl_clip_scale,
    kron_apply,
    sym_eigh,
)

D = torch.float64


def spd(n, gen, cond=50.0):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    return q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=D)) @ q.T


def vec_f(x):
    """Column-major vec."""
    return x.T.reshape(-1)


def unvec_f(v, rows, cols):
    return v.reshape(cols, rows).T


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def test_ok1_kronecker_identity_column_and_row_major(gen):
    a, g = spd(4, gen), spd(3, gen)
    x = torch.randn(3, 4, generator=gen, dtype=D)
    want = torch.linalg.solve(torch.kron(a, g), vec_f(x))
    got = kron_apply(torch.linalg.inv(g), x, torch.linalg.inv(a))
    torch.testing.assert_close(vec_f(got), want, rtol=1e-10, atol=1e-12)
    # row-major flattening (Tensor.reshape) needs the swapped order G ⊗ A
    want_rm = torch.linalg.solve(torch.kron(g, a), x.reshape(-1))
    torch.testing.assert_close(got.reshape(-1), want_rm, rtol=1e-10, atol=1e-12)
    # and A ⊗ G is NOT the right row-major operator (negative control)
    wrong = torch.linalg.solve(torch.kron(a, g), x.reshape(-1))
    assert (wrong - got.reshape(-1)).abs().max() > 1e-3


def test_ok2_factored_damping_is_not_plain_tikhonov(gen):
    a, g = spd(4, gen), spd(3, gen)
    lam = 0.3
    r = math.sqrt(lam)
    ia = torch.linalg.inv(a + r * torch.eye(4, dtype=D))
    ig = torch.linalg.inv(g + r * torch.eye(3, dtype=D))
    lhs = torch.kron(ia, ig)
    i3, i4, i12 = (torch.eye(n, dtype=D) for n in (3, 4, 12))
    expanded = torch.kron(a, g) + r * (torch.kron(a, i3) + torch.kron(i4, g)) + lam * i12
    torch.testing.assert_close(lhs, torch.linalg.inv(expanded), rtol=1e-10, atol=1e-12)
    plain = torch.linalg.inv(torch.kron(a, g) + lam * i12)
    assert (lhs - plain).abs().max() > 1e-3
    # factored_shifts without π gives exactly these shifts
    sa, sg = factored_shifts(a, g, lam, use_pi=False)
    assert float(sa) == pytest.approx(r) and float(sg) == pytest.approx(r)


def test_pi_and_factored_shifts(gen):
    a, g = spd(5, gen) * 7.0, spd(3, gen) * 0.1
    pi = factored_pi(a, g)
    want = math.sqrt((torch.trace(a).item() / 5) / (torch.trace(g).item() / 3))
    assert float(pi) == pytest.approx(want, rel=1e-12)
    sa, sg = factored_shifts(a, g, 0.01)
    assert float(sa) == pytest.approx(want * 0.1, rel=1e-12)
    assert float(sg) == pytest.approx(0.1 / want, rel=1e-12)
    # batched
    pis = factored_pi(torch.stack([a, a]), torch.stack([g, 2 * g]))
    assert pis.shape == (2,)
    assert float(pis[1]) == pytest.approx(want / math.sqrt(2), rel=1e-12)


def test_of1_eigen_path_equals_dense_exact_tikhonov(gen):
    a, g = spd(5, gen), spd(4, gen)
    a[:, 0] = a[0, :] = 0  # singular factor: the floor must not break the exact solve
    x = torch.randn(4, 5, generator=gen, dtype=D)
    lam = 1e-2
    d_a, q_a = sym_eigh(a)
    d_g, q_g = sym_eigh(g)
    got = eigen_apply(q_g, d_g, x, q_a, d_a, denom_shift=lam)
    dense = torch.kron(a, g) + lam * torch.eye(20, dtype=D)
    want = unvec_f(torch.linalg.solve(dense, vec_f(x)), 4, 5)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_eigen_path_factored_equals_dense_factored(gen):
    a, g = spd(5, gen), spd(4, gen)
    x = torch.randn(4, 5, generator=gen, dtype=D)
    sa, sg = factored_shifts(a, g, 0.05)
    d_a, q_a = sym_eigh(a)
    d_g, q_g = sym_eigh(g)
    got = eigen_apply(q_g, d_g, x, q_a, d_a, shift_g=sg, shift_a=sa)
    dense = torch.kron(a + sa * torch.eye(5, dtype=D), g + sg * torch.eye(4, dtype=D))
    want = unvec_f(torch.linalg.solve(dense, vec_f(x)), 4, 5)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_eigen_inverse_equals_dense_inverse(gen):
    a = spd(5, gen)
    d, q = sym_eigh(a)
    torch.testing.assert_close(eigen_inverse(d, q, 0.2),
                               torch.linalg.inv(a + 0.2 * torch.eye(5, dtype=D)),
                               rtol=1e-10, atol=1e-12)


def test_damped_inverse_cholesky(gen):
    a = spd(6, gen)
    got = damped_inverse(a, 0.5)
    torch.testing.assert_close(got, torch.linalg.inv(a + 0.5 * torch.eye(6, dtype=D)),
                               rtol=1e-10, atol=1e-12)
    batch = torch.stack([a, 2 * a])
    got_b = damped_inverse(batch, torch.tensor([0.5, 1.0], dtype=D))
    torch.testing.assert_close(got_b[1], torch.linalg.inv(2 * a + torch.eye(6, dtype=D)))
    # half-precision input is factorised in float32 and returned in half
    h = damped_inverse(a.half(), 0.5)
    assert h.dtype == torch.float16
    torch.testing.assert_close(h.double(), got, rtol=2e-2, atol=2e-3)
    # not positive definite -> NaN (rejected by callers without a host sync)
    bad = damped_inverse(-torch.eye(3, dtype=D), 0.1)
    assert torch.isnan(bad).all()


def test_of3_kl_clip(gen):
    grads = [torch.randn(3, 4, generator=gen, dtype=D), torch.randn(2, 2, generator=gen,
                                                                     dtype=D)]
    dirs = [g * 3.0 for g in grads]
    lr, kappa = 0.1, 1e-3
    quad = lr**2 * sum(float((g * p).sum()) for g, p in zip(grads, dirs))
    nu = float(kl_clip_scale(grads, dirs, lr, kappa))
    assert quad > kappa
    assert nu == pytest.approx(math.sqrt(kappa / quad), rel=1e-12)
    assert lr**2 * nu**2 * quad / lr**2 <= kappa * (1 + 1e-12)
    # already inside the trust region: ν = 1
    assert float(kl_clip_scale(grads, dirs, 1e-4, kappa)) == 1.0
    # non-positive curvature sum: no clipping
    assert float(kl_clip_scale(grads, [-d for d in dirs], lr, kappa)) == 1.0


def test_sym_eigh_retries_in_float64(gen, monkeypatch):
    a = spd(4, gen).float()
    real = torch.linalg.eigh
    dtypes = []

    def flaky(m):
        dtypes.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("no convergence")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    d, q = sym_eigh(a)
    assert dtypes == [torch.float32, torch.float64] and d.dtype == torch.float32
    torch.testing.assert_close(q @ torch.diag(d) @ q.T, a, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (_ for _ in ()).throw(
        torch.linalg.LinAlgError("never")))
    d, q = sym_eigh(a)
    assert torch.isnan(d).all() and torch.isnan(q).all()


def test_sym_eigh_flushes_subnormal_eigenvector_entries(gen, monkeypatch):
    """Subnormal entries of Q become 0 and nothing else changes; eigenvalues below the floor
    become 0."""
    a = spd(5, gen).float()
    tiny = torch.finfo(torch.float32).tiny
    d0, q0 = torch.linalg.eigh(a)
    d0[0] = 1e-12  # below the floor
    q0[1, 2] = tiny / 4  # subnormal
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (d0.clone(), q0.clone()))
    d, q = sym_eigh(a)
    assert q[1, 2] == 0
    mask = torch.ones_like(q, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.equal(q[mask], q0[mask])
    assert d[0] == 0 and torch.equal(d[1:], d0[1:])


def test_sym_eigh_decouples_zero_rows(gen, monkeypatch):
    """Zero rows / columns (dead units) reach LAPACK with a positive diagonal, and the result
    still matches float64 ``eigvalsh`` of the original matrix and reconstructs it."""
    x = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    x[:, [1, 4, 5]] = 0.0
    a = (x.T @ x / 30).float()
    real = torch.linalg.eigh
    seen = []
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: seen.append(m) or real(m))
    d, q = sym_eigh(a)
    assert (seen[0].diagonal() > 0).all()
    want = torch.linalg.eigvalsh(a.double())
    torch.testing.assert_close(d.double().sort().values, want.clamp(min=0).where(
        want >= 1e-10, 0.0), rtol=1e-5, atol=1e-5)
    assert (d == 0).sum() == 3
    torch.testing.assert_close(q @ torch.diag(d) @ q.T, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.T @ q, torch.eye(8), rtol=0, atol=1e-5)


@pytest.mark.parametrize("ones", [False, True])
@pytest.mark.parametrize("d", [1, 7, 8, 9, 23])
def test_gram_blocks_equal_dense_product(gen, d, ones):
    x = torch.randn(11, d, generator=gen, dtype=torch.float64)
    got = gram(x, 0.5, block=8, ones=ones)
    rows = torch.cat((x, torch.ones(11, 1, dtype=x.dtype)), 1) if ones else x
    torch.testing.assert_close(got, 0.5 * rows.T @ rows, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got, got.T, rtol=1e-14, atol=1e-14)
