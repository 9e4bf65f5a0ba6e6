"""Dense BFGS inverse update against the product form and its defining properties (O-M2)."""

import pytest
import torch

from secant.linalg import bfgs_inverse_update_, cautious_accept

pytestmark = pytest.mark.usefixtures("float64_default")


def test_matches_product_form_secant_and_pd():
    gen = torch.Generator().manual_seed(0)
    n = 9
    m = torch.randn(3, n, n, generator=gen)
    h = m @ m.transpose(1, 2) + torch.eye(n)
    s = torch.randn(3, n, generator=gen)
    y = s + 0.3 * torch.randn(3, n, generator=gen)
    assert bool(((s * y).sum(-1) > 0).all())
    for b in range(3):
        got = h.clone()
        assert bool(bfgs_inverse_update_(got[b], s[b], y[b], torch.tensor(True)))
        rho = 1.0 / (s[b] @ y[b])
        left = torch.eye(n) - rho * torch.outer(s[b], y[b])
        ref = left @ h[b] @ left.T + rho * torch.outer(s[b], s[b])
        torch.testing.assert_close(got[b], ref, rtol=1e-10, atol=1e-10)
        assert all(torch.equal(got[c], h[c]) for c in range(3) if c != b)
        torch.testing.assert_close(got[b] @ y[b], s[b], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[b], got[b].T)
        assert torch.linalg.eigvalsh(got[b]).min() > 0


def test_cautious_accept():
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [float("nan"), 0.0]])
    y = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1e-5, 0.0], [1.0, 0.0]])
    scale = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert cautious_accept(s, y, scale).tolist() == [True, False, False, False]
