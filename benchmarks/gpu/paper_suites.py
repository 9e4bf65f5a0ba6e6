"""Run the paper-ae and paper-cnn suites on one GPU and write their reports.

    python benchmarks/gpu/paper_suites.py --out gpu-results [--data-dir DIR]
    python benchmarks/gpu/paper_suites.py --out gpu-check --device cpu --tiny   # plumbing check

Plan for one H100 within 8 minutes (an estimate: this script has not yet run on a GPU; the
wall time of each suite is printed and the script exits 1 when the total passes 8 minutes):

* paper-ae: the CURVES-like autoencoder (and MNIST with --data-dir) at batch 1000, the K-BFGS
  paper's contenders, 3 seeds, ``--ae-epochs`` epochs (default 20; the suite's own budget is
  100, as in the committed CPU run ``benchmarks/results/paper-ae``).
* paper-cnn: CIFAR-10 ResNet-18 and the small ViT at batch 128, 1 seed, ``--cnn-epochs``
  epochs (default 1), real CIFAR-10 with --data-dir, else synthetic CIFAR-shaped data
  (throughput only: the losses mean little).

Every run is timed with ``torch.cuda.synchronize`` after each step (``secant bench --device
cuda``). ``--tiny`` shrinks every budget to a few steps, for checking the script on a CPU:
``--out <new dir> --device cpu --tiny --threads 1 --optimizers sgd,kfac,kbfgs`` ran both suites
and wrote both reports (exit 0) in 635 s on the shared 2-core development CPU, most of it
ResNet-18 on one thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from secant.cli import main as secant

LIMIT_S = 8 * 60


def suite_commands(args: argparse.Namespace) -> list[list[str]]:
    ae, cnn = (0.05, 0.02) if args.tiny else (args.ae_epochs, args.cnn_epochs)
    common = ["--device", args.device, "--no-progress", "--threads", str(args.threads)]
    if args.optimizers:
        common += ["--optimizers", args.optimizers]
    if args.tiny:
        common += ["--evals", "2"]
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    return [
        ["bench", "--suite", "paper-ae", "--epochs", f"{ae:g}", "--seeds", "1" if args.tiny
         else "3", "--out", str(Path(args.out) / "paper-ae"), *data, *common],
        ["bench", "--suite", "paper-cnn", "--epochs", f"{cnn:g}", "--seeds", "1",
         "--out", str(Path(args.out) / "paper-cnn"), *data, *common],
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="new folder; each suite writes a subfolder")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--data-dir", help="MNIST IDX files and CIFAR-10 binary batches")
    p.add_argument("--ae-epochs", type=float, default=20.0)
    p.add_argument("--cnn-epochs", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=4, help="torch CPU threads")
    p.add_argument("--optimizers", help="comma-separated subset (default: every available)")
    p.add_argument("--tiny", action="store_true", help="a few steps per run (CPU check)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    for cmd in suite_commands(args):
        t0 = time.perf_counter()
        rc = secant(cmd)
        print(f"secant {' '.join(cmd)}: exit {rc}, {time.perf_counter() - t0:.0f} s",
              flush=True)
        if rc != 0:
            return rc
    total = time.perf_counter() - start
    print(f"total wall time {total:.0f} s (limit {LIMIT_S} s on one H100)")
    return 1 if total > LIMIT_S and not args.tiny else 0


if __name__ == "__main__":
    sys.exit(main())
