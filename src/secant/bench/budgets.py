"""Work budgets and the divergence rule (``docs/bench.md``, Budgets and divergence).

A run *diverges* when its minibatch loss goes non-finite, or when an evaluation of the
training subset exceeds the problem's ceiling::

    ceiling = 1.5 · L₀                                  during the first epoch
    ceiling = 1.5 · min(L₀, max(L_trivial, L_best))     afterwards

``L₀`` is the training-subset loss at initialisation, ``L_best`` the lowest one the run has
reached so far and ``L_trivial`` the loss of the best input-independent predictor (the
per-pixel mean image for an autoencoder, the class frequencies for a classifier; the
quadratic has none, taken as 0). So a run may be slow, but once past the first epoch it may
not climb back half again above the better of where it got and what a constant predictor
scores: the issue's K-FAC run on CURVES, back to 359.8 from its 183 plateau (the mean-image
loss there is 183.2), is diverged. A diverged run stops at once, is never scored as reaching a
target and can never be chosen by tuning.
"""

from __future__ import annotations

import math

FACTOR = 1.5


def ceiling(initial: float, trivial: float | None, best: float, epochs_done: float) -> float:
    """The largest training-subset loss a run may show after ``epochs_done`` epochs, having
    reached ``best`` at its earlier evaluations."""
    if epochs_done < 1.0:
        return FACTOR * initial
    return FACTOR * min(initial, max(trivial or 0.0, best))


def diverged(loss: float, initial: float, trivial: float | None, best: float,
             epochs_done: float) -> bool:
    return not math.isfinite(loss) or loss > ceiling(initial, trivial, best, epochs_done)


def warmup_steps(total: int) -> int:
    """Steps left out of the median step time: the first 5 % (at least 3, at most 50), which
    pay for lazy initialisation, allocator growth and first-use kernels."""
    return min(50, max(3, total // 20))
