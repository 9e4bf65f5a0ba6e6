"""O-M5 (docs/momentum_lbfgs.md §9): the mL-BFGS τ-damping invariant over arbitrary pairs,
and Powell / double damping (O-K3 form) checked against their defining inequalities."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secant.linalg import double_damping, powell_damping, tau_coefficient

SIGMA_L, SIGMA_H, TAU0 = 0.01, 1.5, 0.99


def tau_damping(s, y, sigma_low, sigma_high, tau_max):
    """ŷ = τ y + (1 − τ) s with τ from the rule under test."""
    tau, _ = tau_coefficient((s * y).sum(-1), (s * s).sum(-1), sigma_low, sigma_high, tau_max)
    return tau.unsqueeze(-1) * y + (1 - tau.unsqueeze(-1)) * s, tau

vectors = st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-1, 1, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.floats(-1, 1, allow_nan=False), min_size=n, max_size=n),
        st.integers(-60, 60),  # log10 scale of s
        st.integers(-60, 60),  # log10 scale of y
    )
)


@settings(max_examples=400, deadline=None)
@given(vectors)
def test_tau_damping_keeps_ratio_in_bounds(data):
    s_list, y_list, es, ey = data
    s = torch.tensor(s_list, dtype=torch.float64) * 10.0**es
    y = torch.tensor(y_list, dtype=torch.float64) * 10.0**ey
    ss = float(s @ s)
    if ss < torch.finfo(torch.float64).tiny:  # 0, or subnormal: sᵀŷ underflows to 0
        return
    r = float(s @ y) / ss
    y_hat, tau = tau_damping(s, y, SIGMA_L, SIGMA_H, TAU0)
    r_hat = float(s @ y_hat) / ss
    tol = 1e-9 * max(1.0, abs(r))
    assert SIGMA_L - tol <= r_hat <= SIGMA_H + tol
    assert float(s @ y_hat) > 0
    if SIGMA_L <= r <= SIGMA_H:
        torch.testing.assert_close(y_hat, TAU0 * y + (1 - TAU0) * s)
    elif r < SIGMA_L and (1 - SIGMA_L) / (1 - r) < TAU0:
        assert math.isclose(r_hat, SIGMA_L, rel_tol=1e-9, abs_tol=tol)
    elif r > SIGMA_H and (SIGMA_H - 1) / (r - 1) < TAU0:
        assert math.isclose(r_hat, SIGMA_H, rel_tol=1e-9, abs_tol=tol)
    assert 0 <= float(tau) <= TAU0


def test_tau_damping_invariant_random_trials():
    """10⁴ random pairs with sᵀy of both signs and norms from 1e-30 to 1e30: no violation."""
    gen = torch.Generator().manual_seed(0)
    n = 16
    s = torch.randn(10_000, n, generator=gen, dtype=torch.float64)
    y = torch.randn(10_000, n, generator=gen, dtype=torch.float64)
    s = s * 10.0 ** torch.randint(-30, 31, (10_000, 1), generator=gen)
    y = y * 10.0 ** torch.randint(-30, 31, (10_000, 1), generator=gen)
    y_hat, _ = tau_damping(s, y, SIGMA_L, SIGMA_H, TAU0)
    r_hat = (s * y_hat).sum(-1) / (s * s).sum(-1)
    assert bool(((r_hat >= SIGMA_L * (1 - 1e-9)) & (r_hat <= SIGMA_H * (1 + 1e-9))).all())


def test_tau_nonfinite_ratio_is_flagged():
    tau, _ = tau_coefficient(torch.tensor([1.0, float("nan")]), torch.tensor([0.0, 1.0]),
                             SIGMA_L, SIGMA_H, TAU0)
    assert not torch.isfinite(tau).any()


def test_powell_damping_on_b_and_h():
    gen = torch.Generator().manual_seed(1)
    n = 7
    for _ in range(200):
        m = torch.randn(n, n, generator=gen, dtype=torch.float64)
        spd = m @ m.T + 0.1 * torch.eye(n, dtype=torch.float64)
        s = torch.randn(n, generator=gen, dtype=torch.float64)
        y = torch.randn(n, generator=gen, dtype=torch.float64)
        mu = 0.2
        y_t = powell_damping(s, y, spd @ s, mu)
        sbs = float(s @ spd @ s)
        if float(s @ y) >= mu * sbs:
            assert torch.equal(y_t, y)
        else:
            assert math.isclose(float(s @ y_t), mu * sbs, rel_tol=1e-10)


def test_double_damping_guarantees():
    """O-K3: after step 1 s̃ᵀy ≥ μ1 yᵀHy, after step 2 s̃ᵀỹ ≥ μ2 ‖s̃‖²; good pairs unchanged."""
    gen = torch.Generator().manual_seed(2)
    n = 6
    mu1, mu2 = 0.2, 0.3
    for _ in range(300):
        m = torch.randn(n, n, generator=gen, dtype=torch.float64)
        h = m @ m.T + 0.1 * torch.eye(n, dtype=torch.float64)
        s = torch.randn(n, generator=gen, dtype=torch.float64)
        y = torch.randn(n, generator=gen, dtype=torch.float64)
        s_t, y_t, _, _ = double_damping(s, y, h @ y, mu1, mu2)
        assert float(s_t @ y) >= mu1 * float(y @ h @ y) * (1 - 1e-10)
        assert float(s_t @ y_t) >= mu2 * float(s_t @ s_t) * (1 - 1e-10)
    a = torch.eye(n, dtype=torch.float64) * 2.0
    s = torch.randn(n, generator=gen, dtype=torch.float64)
    y = a @ s  # with H = A⁻¹: sᵀy = yᵀHy = 2‖s‖², both conditions hold
    s_t, y_t, _, _ = double_damping(s, y, torch.linalg.solve(a, y), mu1, mu2)
    assert torch.equal(s_t, s) and torch.equal(y_t, y)


def test_active_only_where_the_bounds_change_the_pair():
    """With σ_L = 0.01 and τ_max = 0.99, a ratio in [0, σ_L) needs τ ≥ 0.99: capped, the same
    ŷ as an in-bounds pair, so not counted; a negative ratio or one above σ_H is."""
    r = torch.tensor([0.005, 0.5, -0.2, 3.0], dtype=torch.float64)
    tau, active = tau_coefficient(r, torch.ones_like(r), 0.01, 1.5, 0.99)
    assert active.tolist() == [False, False, True, True]
    assert tau[0] == tau[1] == 0.99
    assert 1 - tau[2] * (1 - r[2]) == pytest.approx(0.01)
