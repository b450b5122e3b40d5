"""The state of one ``curvopt train`` run: what :func:`~curvopt.programs.train.run.set_up` builds and every later
stage (epochs, checkpoints, alarms, messages) reads and updates."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...control.averaging import ModelAverage
from ...control.monitor import Alarm
from ...control.optimizer import CurvatureAwareOptimizer
from ...reporting.loggers import JsonlLogger
from ...reporting.wandb_logger import WandbLogger
from .loop import EpochContext
from .setup import Data


def silent(*args: Any, **kwargs: Any) -> None:
    """``print`` on ranks other than 0."""


@dataclass
class TrainingRun:
    """The parts of one run, built by :func:`set_up` and used by every later stage."""

    args: argparse.Namespace
    device: torch.device
    data: Data
    model: nn.Module
    train_model: nn.Module
    model_ema: Any
    opt: CurvatureAwareOptimizer
    scheduler: Any
    num_epochs: int
    autocast: Any
    loss_scaler: Any
    epoch_context: EpochContext
    stem_note: str = ""
    cadence_note: str = ""
    say: Any = print
    run_dir: Path = Path()
    run_id: str = ""
    jsonl: JsonlLogger | None = None
    wandb_logger: WandbLogger | None = None
    start_epoch: int = 0
    num_updates: int = 0
    best_top1: float = -math.inf
    best_epoch: int = -1
    skipped_batches: int = 0
    epoch: int = 0
    last_lr: float | None = None
    stop_alarm: Alarm | None = None
    alarms_handled: int = 0
    rolled_back: dict[str, Any] | None = None
    rollback_average: ModelAverage | None = None  # --rollback-average: sampled at the estimates, every rank
    update_times: list[float] = field(default_factory=list)  # wall time of updates without an estimate
    last_update_at: float | None = None
    cost_said: bool = False
    last_epoch_stats: dict[str, float] = field(default_factory=dict)

    @property
    def main_process(self) -> bool:
        return self.args.rank == 0

    @property
    def sinks(self) -> list[Any]:
        return [s for s in (self.jsonl, self.wandb_logger) if s is not None]

    def log_event(self, step: int, kind: str, text: str) -> None:
        for sink in self.sinks:
            sink.log_event(step, kind, text)
