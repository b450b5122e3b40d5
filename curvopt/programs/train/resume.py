"""What a resumed run runs: the checkpoint's settings, changed only where it is safe and said.

``curvopt train --resume RUN/last.pth.tar`` continues with the arguments the checkpoint was trained
with; flags on the command line (and keys of a ``--config`` recipe) override them. Settings that
define the trajectory (model, data, optimizer, schedule, seed, label noise, ...) must match the
checkpoint: a difference is refused with a one-line error *before* anything is written. Settings
that only change what is measured or logged (``--epochs`` to extend a run, the curvature cadence,
the CUSUM thresholds, logging) are applied from the resume step on, and the change is recorded as a
``settings_changed`` event, so what the logs say is what ran.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ...control.settings import MonitorConfig, flag_dest, flagged_options
from .errors import TrainError

CHANGEABLE = frozenset(
    {
        "epochs",
        "curv_every",
        "curv_probes",
        "curv_batch_size",
        "curv_inter_every",
        "curv_estimator",
        "curv_dtype",
        "curv_strategy",
        "fsdp",
        "rollback_keep",
        "rollback_average",
        "rollback_to",
        "rollback_then",
        "rollback_lr_factor",
        *(flag_dest(meta["flag"]) for _, meta in flagged_options(MonitorConfig)),  # the monitor's rule
        "on_alarm",
        "log_interval",
        "log_wandb",
        "wandb_project",
        "wandb_tags",
        "no_progress",
        "workers",
        "validation_batch_size",
        "device",
        "dist_backend",
        "dist_url",
        "data_dir",
        "dataset_download",
    }
)
"""Settings a resume may change (applied from the resume step on, recorded as a ``settings_changed`` event)."""

BOOKKEEPING = frozenset(
    {
        "config",
        "resume",
        "output",
        "experiment",
        "explicit",
        "from_recipe",
        "run_id",
        "distributed",
        "rank",
        "world_size",
        "local_rank",
        "device_type",
    }
)
"""Arguments that describe this invocation, not the run."""


def merge_resume_args(args: argparse.Namespace, checkpoint: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Make ``args`` the checkpoint's settings plus what this invocation asked for; returns the changes
    ``{name: (checkpoint value, new value)}``. Raises :class:`TrainError` for a change that is not allowed."""
    saved = dict(checkpoint.get("args") or {})
    asked = set(getattr(args, "explicit", ())) | set(getattr(args, "from_recipe", ()))
    changes: dict[str, tuple[Any, Any]] = {}
    refused: list[str] = []
    for name, old in saved.items():
        if name in BOOKKEEPING or not hasattr(args, name):
            continue
        new = getattr(args, name) if name in asked else old
        if new == old:
            setattr(args, name, old)
            continue
        if name not in CHANGEABLE:
            refused.append(f"--{name.replace('_', '-')} {old!r} (asked: {new!r})")
            continue
        setattr(args, name, new)
        changes[name] = (old, new)
    if refused:
        raise TrainError(
            f"--resume {args.resume}: the checkpoint was trained with {'; '.join(refused)}; these define the run "
            "and cannot change on resume (start a new run for that)"
        )
    return changes
