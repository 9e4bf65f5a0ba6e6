"""secant: practical stochastic quasi-Newton optimizers for deep learning in PyTorch."""

from secant.optim import KBFGS, KBFGSL, KFAC, MomentumLBFGS, Neumann

__version__ = "0.1.0"

__all__ = ["KBFGS", "KBFGSL", "KFAC", "MomentumLBFGS", "Neumann", "__version__"]
