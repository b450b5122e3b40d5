"""The per-layer text table of one estimate (``CurvatureEstimate.summary()``), with a two-line legend.

Callers add columns of their own (the optimizer's LR scales and CUSUM statistics, in
:func:`curvopt.reporting.tables.format_table`) as already formatted strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class TabulatedEstimate(Protocol):
    """What the table reads of an estimate (:class:`~curvopt.estimators.trace.CurvatureEstimate` is one): this
    module needs no import of it, so the estimate's own ``summary()`` can use the table."""

    layers: list[str]
    numel: Mapping[str, int]
    trace: Mapping[str, float]
    trace_se: Mapping[str, float]
    gn_trace: Mapping[str, float]
    gn_gap: Mapping[str, float]

    @property
    def has_gn(self) -> bool: ...

    @property
    def total_trace(self) -> float: ...

    @property
    def total_trace_se(self) -> float: ...

    @property
    def total_gn_trace(self) -> float: ...

    @property
    def total_gn_gap(self) -> float: ...

    def label(self, name: str) -> str: ...


LEGEND = (
    "trace: Hutchinson estimate of tr(H_ll), the layer's Hessian trace, ± its standard error (K probes)",
    "gn_trace: tr(G_ll), its Gauss-Newton part; gn_gap: ||H^T_l,:||_F / ||G_l,:||_F (0: H = G, >1: tensor part "
    "dominates)",
)

Column = tuple[str, int, Mapping[str, str], str]  # (header, width, per-layer text, total-row text)


def format_estimate(
    estimate: TabulatedEstimate,
    extra: Sequence[Column] = (),
    legend: Sequence[str] = (),
) -> str:
    """Layer (``name · type``), d_l, trace ± SE, GN trace and GN-Gap (with ``gn``), then ``extra`` columns,
    a model row (all layers) and the legend."""
    labels = {name: estimate.label(name) for name in estimate.layers}
    w = max([12, *(len(label) + 2 for label in labels.values())])
    gn = estimate.has_gn
    header = f"{'layer':<{w}}{'numel':>10}{'trace':>11}{'± se':>9}"
    header += f"{'gn_trace':>11}{'gn_gap':>8}" if gn else ""
    header += "".join(f"{title:>{width}}" for title, width, _, _ in extra)
    rows = [header, "-" * len(header)]
    for name in estimate.layers:
        row = f"{labels[name]:<{w}}{estimate.numel[name]:>10}"
        row += f"{estimate.trace[name]:>11.3g}{estimate.trace_se[name]:>9.2g}"
        row += f"{estimate.gn_trace[name]:>11.3g}{estimate.gn_gap[name]:>8.3g}" if gn else ""
        row += "".join(f"{cells.get(name, '–'):>{width}}" for _, width, cells, _ in extra)
        rows.append(row)
    total = (
        f"{'model (all)':<{w}}{sum(estimate.numel.values()):>10}{estimate.total_trace:>11.3g}"
        f"{estimate.total_trace_se:>9.2g}"
    )
    total += f"{estimate.total_gn_trace:>11.3g}{estimate.total_gn_gap:>8.3g}" if gn else ""
    total += "".join(f"{cell:>{width}}" for _, width, _, cell in extra)
    rows += ["-" * len(header), total, *(LEGEND if gn else LEGEND[:1]), *legend]
    return "\n".join(rows)
