import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def float64_default():
    """Run a test with float64 as torch's default dtype, restoring the previous default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
