"""Pure tensor math shared by the optimizers: no modules, no optimizer state."""

from secant.linalg.bfgs import bfgs_inverse_update_, cautious_accept
from secant.linalg.damping import double_damping, powell_damping, tau_coefficient
from secant.linalg.lbfgs import (
    History,
    block_dot,
    block_sum,
    compact_apply,
    new_history,
    newest_gamma,
    newest_pair,
    pair_spectrum,
    push,
    two_loop,
)

__all__ = [
    "History",
    "bfgs_inverse_update_",
    "block_dot",
    "block_sum",
    "cautious_accept",
    "compact_apply",
    "double_damping",
    "new_history",
    "newest_gamma",
    "newest_pair",
    "pair_spectrum",
    "powell_damping",
    "push",
    "tau_coefficient",
    "two_loop",
]
