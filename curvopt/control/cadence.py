"""How often a run estimates curvature when nobody said, and the one line that says what a run will measure.

The memorisation monitor needs ``calibration`` estimates (:attr:`~curvopt.CusumMonitor.calibration_estimates`)
before it can alarm, and watches the ones after. A run of ``total`` optimizer steps with no cadence chosen
estimates every :data:`DEFAULT_EVERY` steps, or every ``total // AUTO_ESTIMATES`` when that would give fewer than
:data:`AUTO_ESTIMATES` estimates, so short runs (a 100- or 1,000-step fine-tune) still get a verdict. A cadence the
user chose is kept, and the line warns when it leaves the monitor no verdict. The CLI (``--curv-every``) and the
framework callbacks (``every=``) share this rule; ``option`` names the setting where the line is printed.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_EVERY = 500
AUTO_ESTIMATES = 20
"""With no cadence chosen, a run too short for this many estimates at every 500 steps estimates more often: the
monitor calibrates on the first 9 and watches the other 11."""


@dataclass(frozen=True)
class CadencePlan:
    """A run's curvature cadence: ``every`` optimizer steps, ``estimates`` in ``total`` steps."""

    every: int
    total: int | None  # None: the run's length is unknown
    chosen: bool  # the user set it (kept as it is)
    calibration: int | None  # estimates before the monitor can alarm (None: no monitor)

    @property
    def estimates(self) -> int | None:
        """Estimates in the run (``None`` when its length is unknown)."""
        if self.total is None:
            return None
        return self.total // self.every if self.every > 0 else 0

    @property
    def gives_verdict(self) -> bool:
        """Whether the monitor is calibrated before the run ends, with at least one estimate left to watch (assumed
        when the run's length is unknown)."""
        return self.calibration is None or self.estimates is None or self.estimates > self.calibration

    @property
    def ready_at_step(self) -> int | None:
        """The optimizer step of the estimate that completes calibration (None: never in this run, or no monitor)."""
        if self.calibration is None or self.every <= 0:
            return None
        if self.estimates is not None and self.estimates < self.calibration:
            return None
        return self.calibration * self.every


def plan_cadence(total: int | None, every: int | None, calibration: int | None) -> CadencePlan:
    """The cadence of a run of ``total`` optimizer steps (``None``: unknown): ``every`` when set, else chosen
    (module docstring; :data:`DEFAULT_EVERY` when the length is unknown)."""
    total = None if total is None else max(int(total), 0)
    if every is not None:
        if every < 0:
            raise ValueError(f"every must be >= 0 optimizer steps, got {every}")
        return CadencePlan(int(every), total, True, calibration)
    chosen = DEFAULT_EVERY if total is None else max(1, min(DEFAULT_EVERY, total // AUTO_ESTIMATES))
    return CadencePlan(chosen, total, False, calibration)


def describe_cadence(
    plan: CadencePlan,
    option: str,
    *,
    probes: int | str | None = None,
    batch: int | None = None,
    unit: tuple[str, str] = ("step", "optimizer steps"),
) -> str:
    """The line that says what a run will measure: how many estimates, when the monitor is ready, what it costs.

    ``option`` is the setting as the reader writes it (``"--curv-every"``, ``"every="``); ``probes`` and ``batch``
    (products per estimate and curvature batch size) add the cost in forward+backward passes; ``unit`` names a
    step (singular, plural) as the reader counts them (the CLI counts "updates").
    """
    one, many = unit
    if plan.every == 0:
        return f"curvature monitoring off ({option.rstrip('=')} 0)"
    if plan.total is None:
        how = "" if plan.chosen else f" (the run's length is unknown, so the default; {option} sets it)"
        line = f"curvature every {plan.every} {many}{how}"
        if isinstance(probes, int) and batch:
            line += f", about {probes + 1} forward+backward passes of ≤ {batch} samples each"
        if plan.calibration is None:
            return line
        return f"{line}; the monitor calibrates on the first {plan.calibration} (ready at {one} {plan.ready_at_step})"
    how = "" if plan.chosen else f" (chosen for this {plan.total}-{one} run; {option} sets it)"
    line = f"curvature every {plan.every} {many}: {plan.estimates} estimates in this run{how}"
    if isinstance(probes, int) and batch:
        passes = plan.estimates * (probes + 1)
        line += f", about {passes} forward+backward passes of ≤ {batch} samples in all"
    if plan.calibration is None:
        return line
    if not plan.gives_verdict:
        enough = max(1, plan.total // (plan.calibration + 1))
        return (
            f"{line}; the monitor needs {plan.calibration} to calibrate, so this run gives no memorisation "
            f"verdict: {option.rstrip('=')} {enough} or less makes {plan.calibration + 1}"
        )
    return f"{line}; the monitor calibrates on the first {plan.calibration} (ready at {one} {plan.ready_at_step})"
