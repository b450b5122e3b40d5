"""Where curvature metrics and alarms go: a JSONL file, or your own callbacks.

A logger is any object with ``log(step, metrics)`` and ``alert(alarm)`` (the optimizer's
``CurvatureSink`` protocol). The optimizer catches and warns about logger failures, so a full
disk or a broken callback never stops training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..control.monitor import Alarm


def _jsonable(value: Any) -> Any:
    """Floats as JSON numbers; NaN/Inf (not valid JSON) as null, also inside lists and dicts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


LOG_NAME = "curvature.jsonl"
"""The JSONL log's file name in a run directory (``curvopt train``, the framework callbacks, ``curvopt report``)."""


class JsonlLogger:
    """Appends one JSON object per line, ``{"type": "metrics", "step": …, …}``, ``{"type": "alarm", …}``,
    and from training loops ``train``/``eval``/``config``/``run``/``event`` records.

    Lines are flushed as they are written, so an interrupted run leaves a readable file (at most
    the line being written is torn). A torn last line is cut off when the file is opened again, so
    it never swallows the next record. With ``run_id`` every record carries it. ``curvopt report``
    reads this format.
    """

    def __init__(self, path: str | Path, run_id: str | None = None) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def _write(self, record: Mapping[str, Any]) -> None:
        if self.run_id is not None:
            record = {**record, "run_id": self.run_id}
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def position(self) -> int:
        """Bytes written so far (everything flushed): where a checkpoint taken now should cut the log back to."""
        if self._file.closed:  # a checkpoint after the run ended: the whole file
            return self.path.stat().st_size if self.path.exists() else 0
        self._file.flush()
        return self._file.tell()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._write({"type": "metrics", "step": step, **metrics})

    def alert(self, alarm: Alarm) -> None:
        self._write({"type": "alarm", **alarm.to_dict()})

    def log_config(self, settings: Mapping[str, Any]) -> None:
        """A ``config`` record with the wrapper's settings (called by the optimizer)."""
        self._write({"type": "config", "curvopt": dict(settings)})

    def log_training(self, step: int, metrics: Mapping[str, float]) -> None:
        """A ``train`` record (loss, LR, … of the training loop) at optimizer step ``step``."""
        self._write({"type": "train", "step": step, **metrics})

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """An ``eval`` record (per-epoch validation metrics)."""
        self._write({"type": "eval", "epoch": epoch, **metrics})

    def log_run(self, config: Mapping[str, Any]) -> None:
        """A ``run`` record: what was trained (model, dataset, optimizer, label noise, ...), for reports."""
        self._write({"type": "run", **config})

    def log_event(self, step: int, kind: str, text: str = "") -> None:
        """An ``event`` record at optimizer step ``step`` (``label_noise_start``, ``resume``, ``lr_restart``, ...):
        plots mark it on every time axis."""
        self._write({"type": "event", "step": step, "kind": kind, "text": text})

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    """Truncate a log to its last complete line (an interrupted writer may have left half a record)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, 2)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        handle.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | Path, *, unreadable: list[int] | None = None) -> list[dict[str, Any]]:
    """All complete records of a JSONL log. Lines that are not a JSON object (a torn last line from an interrupted
    run, or damage) are skipped; their 1-based numbers are appended to ``unreadable`` when it is given, so a reader
    can say what it left out."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif unreadable is not None and line.strip():
            unreadable.append(number)
    return records


_KEYS = {"metrics": "step", "train": "step", "alarm": "step", "eval": "epoch"}


def deduplicate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (type, step) — per epoch for ``eval`` — keeping the last one written, in log order.

    Logs of runs resumed by older versions (or appended to by hand) repeat the steps redone after the
    last checkpoint; the later record is the one the continued run built on.
    """
    last: dict[tuple[Any, ...], int] = {}
    for i, record in enumerate(records):
        key_field = _KEYS.get(record.get("type", ""))
        if key_field is not None and key_field in record:
            last[(record["type"], record[key_field])] = i
    keep = set(last.values())
    return [r for i, r in enumerate(records) if _KEYS.get(r.get("type", "")) not in r or i in keep]


class CallbackLogger:
    """Forwards metrics and alarms to plain functions: ``on_metrics(step, metrics)``, ``on_alarm(alarm)``."""

    def __init__(
        self,
        on_metrics: Callable[[int, Mapping[str, float]], None] | None = None,
        on_alarm: Callable[[Alarm], None] | None = None,
    ) -> None:
        self.on_metrics = on_metrics
        self.on_alarm = on_alarm

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.on_metrics is not None:
            self.on_metrics(step, metrics)

    def alert(self, alarm: Alarm) -> None:
        if self.on_alarm is not None:
            self.on_alarm(alarm)


def truncate_log(path: Path, offset: int) -> str:
    """Cut a JSONL log back to ``offset`` bytes (its length when the checkpoint was written), removing the
    records of steps that the resumed run will redo; returns what was done (empty when nothing)."""
    if not path.exists():
        return ""
    size = path.stat().st_size
    if offset > size:
        return f"the log is shorter ({size} bytes) than at the checkpoint ({offset}); kept as it is"
    if offset == size:
        return ""
    with open(path, "r+b") as handle:
        handle.truncate(offset)
    return f"cut back to the checkpoint ({size - offset} bytes of records after it removed)"
