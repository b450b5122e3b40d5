"""The ``curvopt`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from .arguments import OneLineParser


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the probes (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default=None,
        help="W&B mode for the demo's run (default: WANDB_MODE, else offline)",
    )
    sub.add_parser(
        "train",
        add_help=False,
        help="train a timm model with the curvature-aware optimizer (timm train.py flags; --config recipe.yaml)",
    )
    report = sub.add_parser(
        "report",
        help="PNG (and HTML) plots of a run's curvature.jsonl",
        description="Writes the curvature heatmap (each layer's mean squared Hessian eigenvalue ||H_l,:||^2/d_l over "
        "steps), per-layer traces, GN-Gap, CUSUM, LR-scale and loss/accuracy plots into RUN_DIR/report.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or a curvature.jsonl file)")
    report.add_argument("--out-dir", default=None, help="where the pictures go (default RUN_DIR/report)")
    report.add_argument("--html", action="store_true", help="also write one self-contained report.html")
    return parser


def _train(argv: Sequence[str]) -> int:
    from .data import DatasetUnavailableError
    from .recipes import RecipeError, parse_train_args
    from .train.run import TrainError, run_training

    try:
        args = parse_train_args(argv)
        return run_training(args)
    except (RecipeError, TrainError, DatasetUnavailableError) as exc:
        print(f"curvopt train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curvopt train: interrupted (the last completed epoch's checkpoint is intact)", file=sys.stderr)
        return 130


def _report(run_dir: str, out_dir: str | None, html_page: bool) -> int:
    from ..reporting.report import ReportError, make_report

    try:
        paths = make_report(run_dir, out_dir, html_page=html_page)
    except ReportError as exc:
        print(f"curvopt report: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _train(argv[1:])
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
                wandb_mode=args.wandb,
            )
        except ValueError as exc:
            print(f"curvopt demo: {exc}", file=sys.stderr)
            return 2
    if args.command == "report":
        return _report(args.run_dir, args.out_dir, args.html)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
