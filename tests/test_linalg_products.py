"""Batched matrix–vector products against per-matrix products in float64."""

import pytest
import torch

from secant.linalg.products import matvec

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.mark.parametrize("stack", [1, 4])
def test_matvec_is_each_matrix_times_its_vector(stack):
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(stack, 7, 5, generator=gen)  # rectangular, not symmetric
    x = torch.randn(stack, 5, generator=gen)
    got = matvec(m, x)
    assert got.shape == (stack, 7)
    for j in range(stack):
        ref = torch.tensor([sum(m[j, i, k].item() * x[j, k].item() for k in range(5))
                            for i in range(7)])
        torch.testing.assert_close(got[j], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(matvec(m[0], x[0]), got[0], rtol=1e-12, atol=1e-12)  # 2-D form
