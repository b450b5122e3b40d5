"""The ``curvopt`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvopt",
        description="Per-layer curvature of the training loss, measured while you train.",
    )
    parser.add_argument("--version", action="version", version=f"curvopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a small CNN on a built-in synthetic dataset and show per-layer curvature",
        description="Trains a small CNN on a built-in learnable synthetic dataset (no download, CPU "
        "is enough) and prints per-layer Hessian traces, GN traces and GN-Gap as training goes.",
    )
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--every", type=int, default=25, help="estimate every N steps (default 25)")
    demo.add_argument("--probes", type=int, default=8, help="Hutchinson probes K (default 8)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from .demo import run_demo

        try:
            return run_demo(steps=args.steps, every=args.every, probes=args.probes, seed=args.seed)
        except ValueError as exc:
            print(f"curvopt demo: {exc}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
