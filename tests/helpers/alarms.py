"""Scripted alarms: a stand-in for ``CusumMonitor.update`` that raises one alarm at a chosen estimate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from curvopt import Alarm


def alarm_on_estimate(count: int, onset: int, layer: str) -> Callable[[Any, int, Any], list[Alarm]]:
    """An ``update`` (monkeypatched onto ``CusumMonitor``) that raises one alarm naming ``layer`` at the monitor's
    ``count``-th estimate, with its change point at step ``onset``."""

    def update(monitor: Any, step: int, estimate: Any) -> list[Alarm]:
        monitor.count += 1
        return [Alarm(step, [layer], 11.0, 10.0, onset_step=onset)] if monitor.count == count else []

    return update
