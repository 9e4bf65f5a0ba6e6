"""Optimizers: thin state handling around :mod:`secant.linalg`."""

from secant.optim.momentum_lbfgs import MomentumLBFGS

__all__ = ["MomentumLBFGS"]
