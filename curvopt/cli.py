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
        help="watch the CUSUM alarm fire when a small CNN starts memorising random labels",
        description="Trains a small CNN on built-in learnable synthetic images (no download, CPU is enough), "
        "switches the labels to random half-way and shows the curvature monitor's alarm. Exits 0 when the "
        "alarm fired after the switch.",
    )
    demo.add_argument("--steps", type=int, default=800, help="training steps (default 800)")
    demo.add_argument("--every", type=int, default=20, help="estimate every N steps (default 20)")
    demo.add_argument("--probes", type=int, default=8, help="Hutchinson probes K (default 8)")
    demo.add_argument("--lr-scaling", choices=["trace"], default=None, help="layer-wise LR scaling policy")
    demo.add_argument("--out-dir", default="runs/demo", help="where the JSONL log goes (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
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
            return run_demo(
                steps=args.steps,
                every=args.every,
                probes=args.probes,
                seed=args.seed,
                out_dir=args.out_dir,
                lr_scaling=args.lr_scaling,
                progress=not args.no_progress,
            )
        except ValueError as exc:
            print(f"curvopt demo: {exc}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
