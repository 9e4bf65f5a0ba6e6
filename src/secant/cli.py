"""The ``secant`` command line."""

from __future__ import annotations

import argparse

import secant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="secant", description="Stochastic quasi-Newton optimizers for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"secant {secant.__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("demo", help="short training run: MomentumLBFGS vs SGD and Adam")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from secant.demo import main as demo

        demo()
        return 0
    parser.print_help()
    return 0
