"""Checkpoints of ``curvopt train``: written atomically, read with a one-line error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import TrainError

CHECKPOINT = "last.pth.tar"
BEST = "model_best.pth.tar"


class CheckpointError(TrainError):
    """A checkpoint that cannot be read or written; the message is one line."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file and rename: an interruption never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"--resume {path}: no such checkpoint") from None
    except Exception as exc:
        raise CheckpointError(f"--resume {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
