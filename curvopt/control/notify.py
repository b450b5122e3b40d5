"""Where the wrapper's outputs go: loggers, alarm callbacks and the console, on one process only.

A logger is any object with ``log(step, metrics)`` and ``alert(alarm)`` (:class:`CurvatureSink`),
optionally ``log_config(settings)``. A failing logger or callback warns once per kind and never
stops training. Problems arrive as ``RuntimeWarning`` (once each); alarms as a ``WARNING`` record
of the ``curvopt`` logger: each appears once on the console. Under ``torch.distributed`` only
rank 0 of the group reports, so logs, warnings and callbacks appear once however many ranks train.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from ..estimators import distributed as dist_utils
from .monitor import Alarm

log = logging.getLogger("curvopt")


class CurvatureSink(Protocol):
    """What a logger gives the optimizer: metrics by step, and alarms."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def alert(self, alarm: Alarm) -> None: ...

    # optional: ``log_config(settings)`` receives :meth:`CurvatureAwareOptimizer.settings` once


def as_sinks(logger: CurvatureSink | Iterable[CurvatureSink] | None) -> list[CurvatureSink]:
    """``None``, one logger or a list of them, as a list."""
    if logger is None:
        return []
    return list(logger) if isinstance(logger, (list, tuple)) else [logger]  # type: ignore[list-item]


class Notifier:
    """Fans metrics, alarms and warnings out to ``loggers``, ``callbacks`` and the console."""

    def __init__(
        self,
        loggers: list[CurvatureSink],
        callbacks: Iterable[Callable[[Alarm], None]],
        process_group: Any = None,
    ) -> None:
        self.loggers = loggers
        self.callbacks = list(callbacks)
        self.process_group = process_group
        self._warned: set[str] = set()

    @property
    def reports(self) -> bool:
        """Loggers, warnings and alarm callbacks run on one process only (rank 0 of the group)."""
        return dist_utils.rank(self.process_group) == 0

    def warn_once(self, key: str, message: str) -> None:
        """``message`` as a RuntimeWarning, the first time ``key`` occurs (once on the console)."""
        if key in self._warned or not self.reports:
            return
        self._warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def call_safely(self, fn: Callable[..., None], *args: Any, what: str) -> None:
        """Run a logger or callback; a failure warns once per ``what`` and never stops training."""
        try:
            fn(*args)
        except Exception as exc:
            self.warn_once(what, f"curvopt: {what} failed: {exc}")

    def config(self, settings: Mapping[str, Any], only: CurvatureSink | None = None) -> None:
        """Hand the wrapper's settings to every logger (or ``only`` one) that takes them (``log_config``)."""
        if not self.reports:
            return
        for sink in self.loggers if only is None else [only]:
            log_config = getattr(sink, "log_config", None)  # optional part of the sink protocol
            if callable(log_config):
                self.call_safely(log_config, settings, what=f"logger {type(sink).__name__} log_config")

    def metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.reports:
            return
        for sink in self.loggers:
            self.call_safely(sink.log, step, metrics, what=f"logger {type(sink).__name__} ({id(sink):x})")

    def alarm(self, alarm: Alarm) -> None:
        """A ``WARNING`` record on the ``curvopt`` logger (on the console once, also with logging
        unconfigured), every logger's ``alert`` and every alarm callback."""
        if not self.reports:
            return
        log.warning("curvopt: %s", alarm.describe())
        for sink in self.loggers:
            self.call_safely(sink.alert, alarm, what=f"logger {type(sink).__name__} alert ({id(sink):x})")
        for callback in self.callbacks:
            name = getattr(callback, "__name__", type(callback).__name__)
            self.call_safely(callback, alarm, what=f"alarm callback {name} ({id(callback):x})")
