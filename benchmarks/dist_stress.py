"""Stress check of the multi-process tests (not run in CI): each file of ``tests/distributed``
run ``--runs`` times in a row, each time in a fresh pytest process; a run fails if any of its
tests fails or a rank dies. Prints (and with ``--out`` writes) the counts and every failure.

Run: python benchmarks/dist_stress.py --runs 30 --out benchmarks/dist_stress.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from report_out import emit

TESTS = Path(__file__).resolve().parent.parent / "tests" / "distributed"


def run_once(path: Path) -> tuple[bool, float, list[str]]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(path)], capture_output=True, text=True, timeout=1200)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    signals = sorted(set(re.findall(r"terminated with signal (\w+)", done.stdout)))
    return done.returncode == 0, time.perf_counter() - start, failed + signals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--files", nargs="*", default=None,
                    help="test files (default: every tests/distributed/test_*.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    files = [Path(f) for f in args.files] if args.files else sorted(TESTS.glob("test_*.py"))
    rows, failures = [], []
    for path in files:
        ok, times = 0, []
        for i in range(args.runs):
            passed, seconds, what = run_once(path)
            ok += passed
            times.append(seconds)
            if not passed:
                failures.append(f"- {path.name}, run {i + 1}: {', '.join(what) or 'see pytest'}")
            print(f"{path.name} run {i + 1}/{args.runs}: {'ok' if passed else 'FAILED'} "
                  f"({seconds:.0f} s)", file=sys.stderr, flush=True)
        rows.append(f"| {path.name} | {args.runs} | {ok} | {args.runs - ok} | "
                    f"{sorted(times)[len(times) // 2]:.0f} |")
    text = "\n".join([
        "# Stress check of the multi-process tests",
        "",
        f"Command: `python benchmarks/dist_stress.py --runs {args.runs}"
        + (f" --files {' '.join(args.files)}" if args.files else "") + "`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| test file | runs | passed | failed | median s per run |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Failures:" if failures else "Failures: none.",
        *failures,
    ])
    emit(text, args.out)


if __name__ == "__main__":
    main()
