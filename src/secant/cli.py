"""The ``secant`` command line: ``secant bench`` (compare optimizers) and ``secant tune``
(learning-rate grid search that writes the tuning table used by ``secant bench``)."""

from __future__ import annotations

import sys

import secant


def main(argv: list[str] | None = None) -> int:
    from secant.bench.cli import OneLineParser, add_bench_parser, add_tune_parser, dispatch

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = OneLineParser(
        prog="secant", description="Stochastic quasi-Newton optimizers for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"secant {secant.__version__}")
    sub = parser.add_subparsers(dest="command")
    add_bench_parser(sub)
    add_tune_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("bench", "tune"):
        return dispatch(args, argv)
    parser.print_help()
    return 0
