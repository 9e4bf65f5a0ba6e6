"""Tuned defaults, written by ``secant tune`` (``docs/bench.md``, Tuning and Targets).
``choices[problem][optimizer]``: the chosen ``lr`` and ``knob`` (the second hyperparameter),
their score (``loss``: median final training loss over the tuning seeds), why a value is not
strictly inside its grid (``lr_note``, ``knob_note``; empty when it is) and every point tried.
``targets[problem]``: the target loss, the baseline and seeds it comes from, and how."""

TUNED: dict = {'choices': {}, 'targets': {}}
