"""K-BFGS and K-BFGS(L) with a curvature update period T (``curvature_update_period``): the
paper-ae suite's CURVES problem, 100 epochs, 3 seeds, T in {1, 5, 10}.

T = 1 is the registry's ``kbfgs`` / ``kbfgsl`` (the paper's method); T = 5 and 10 are the same
optimizers, at the same tuned learning rate and damping, registered here as ``kbfgs-T5``, ...
Every run goes through ``secant bench`` (same data, seeds, warm start, divergence rule, target
and report), so steps and projected time to the target and the final losses are read off its
report. Results: ``benchmarks/kbfgs_period.md``. Run from the repository root::

    python benchmarks/kbfgs_period.py --out benchmarks/results/kbfgs-period --jobs 2
"""

from __future__ import annotations

import argparse
import dataclasses

import secant
from secant.bench import api, registry, tuned_table

PROBLEM = "curves"
PERIODS = (5, 10)


def register(base: str, period: int) -> str:
    """``base`` with ``curvature_update_period=period``, at ``base``'s tuned lr and damping,
    added to the harness's registry (in this process and the workers it forks)."""
    entry = registry.get_optimizer(base)
    lr, knob, _ = tuned_table.package().settings(entry, PROBLEM)
    cls = {"kbfgs": secant.KBFGS, "kbfgsl": secant.KBFGSL}[base]
    name = f"{base}-T{period}"
    registry.OPTIMIZERS[name] = dataclasses.replace(
        entry, name=name, description=f"{entry.description}; curvature_update_period={period}",
        resolve=lambda: (lambda model, lr, k: cls(model, lr=lr, curvature_update_period=period,
                                                  **k)),
        default_lr=lr, knob=dataclasses.replace(entry.knob, default=knob["damping"]))
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bases", default="kbfgs,kbfgsl")
    args = ap.parse_args()
    names = []
    for base in args.bases.split(","):
        names += [base] + [register(base, t) for t in PERIODS]
    api.run(PROBLEM, optimizers=names, seeds=args.seeds, jobs=args.jobs, out=args.out,
            progress=False, note="curvature update period T: kbfgs / kbfgsl are T = 1 (the "
            "paper); -T5 / -T10 the same optimizer and settings with curvature_update_period")


if __name__ == "__main__":
    main()
