"""secant: practical stochastic quasi-Newton optimizers for deep learning in PyTorch."""

from secant.optim import MomentumLBFGS

__version__ = "0.1.0"

__all__ = ["MomentumLBFGS", "__version__"]
