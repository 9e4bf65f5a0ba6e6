"""K-BFGS (or K-BFGS(L)) with a curvature update period T (``curvature_update_period``): the
paper-ae suite's CURVES problem, 3 seeds, T in {1, 5, 10}, at equal cost.

T = 1 is the registry's ``kbfgs`` / ``kbfgsl`` (the paper's method); T = 5 and 10 are the same
optimizer, at the same tuned learning rate and damping, registered here as ``kbfgs-T5``, ...
Every run goes through ``secant bench --equal-cost`` with T = 1 as the reference: a
calibration phase measures each variant's process CPU time per step (interleaved, in one
process), and every variant gets the cost of T = 1's 100 epochs, so a cheaper step buys more
steps. Steps and time to the target and the losses at equal cost are read off its report.
Results: ``benchmarks/kbfgs_period.md``. Run from the repository root::

    python benchmarks/kbfgs_period.py --out benchmarks/results/kbfgs-period --jobs 2
"""

from __future__ import annotations

import argparse

from secant.bench import api, registry

PROBLEM = "curves"
PERIODS = (5, 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--base", choices=("kbfgs", "kbfgsl"), default="kbfgs")
    args = ap.parse_args()
    names = [args.base] + [
        registry.register_variant(args.base, f"{args.base}-T{t}", PROBLEM,
                                  curvature_update_period=t) for t in PERIODS]
    api.run(PROBLEM, optimizers=names, seeds=args.seeds, jobs=args.jobs, out=args.out,
            equal_cost=args.base, progress=False,
            note=f"curvature update period T: {args.base} is T = 1 (the paper); -T5 / -T10 the "
            "same optimizer and settings with curvature_update_period, at the cost of T = 1's "
            "100 epochs")


if __name__ == "__main__":
    main()
