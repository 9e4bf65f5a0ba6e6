"""Tuned defaults, written by ``secant tune`` (see ``benchmarks/tuning.md`` for the command and
the full grid results). ``lrs[problem][optimizer]`` is the learning rate with the lowest final
training loss on the grid; ``targets[problem]`` the target loss and how it was set."""

TUNED: dict = {"lrs": {}, "targets": {}, "grids": {}}
