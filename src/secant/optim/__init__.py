"""Optimizers: thin state handling around :mod:`secant.linalg`."""

from secant.optim.momentum_lbfgs import MomentumLBFGS
from secant.optim.neumann import Neumann

__all__ = ["MomentumLBFGS", "Neumann"]
