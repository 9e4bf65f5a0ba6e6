"""Work budgets and the divergence rule (``docs/bench.md``, Budgets and divergence).

A run *diverges* when its minibatch loss goes non-finite, or when an evaluation of the
training subset exceeds the problem's ceiling::

    ceiling = 1.5 · L₀                      during the first epoch
    ceiling = 1.5 · min(L₀, L_trivial)      afterwards

``L₀`` is the training-subset loss at initialisation and ``L_trivial`` the loss of the best
input-independent predictor (the per-pixel mean image for an autoencoder, the class
frequencies for a classifier; the quadratic has none). A diverged run stops at once, is never
scored as reaching a target and can never be chosen by tuning.
"""

from __future__ import annotations

import math

FACTOR = 1.5


def ceiling(initial: float, trivial: float | None, epochs_done: float) -> float:
    """The largest training-subset loss a run may show after ``epochs_done`` epochs."""
    if epochs_done < 1.0 or trivial is None:
        return FACTOR * initial
    return FACTOR * min(initial, trivial)


def diverged(loss: float, initial: float, trivial: float | None, epochs_done: float) -> bool:
    return not math.isfinite(loss) or loss > ceiling(initial, trivial, epochs_done)


def warmup_steps(total: int) -> int:
    """Steps left out of the median step time: the first 5 % (at least 3, at most 50), which
    pay for lazy initialisation, allocator growth and first-use kernels."""
    return min(50, max(3, total // 20))
