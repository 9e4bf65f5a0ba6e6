"""Optimizers: thin state handling around :mod:`secant.linalg`."""

from secant.optim.kbfgs import KBFGS, KBFGSL
from secant.optim.kfac import KFAC
from secant.optim.momentum_lbfgs import MomentumLBFGS
from secant.optim.neumann import Neumann

__all__ = ["KBFGS", "KBFGSL", "KFAC", "MomentumLBFGS", "Neumann"]
