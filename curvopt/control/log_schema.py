"""Every key curvopt logs, in one place: writers (the wrapper, the diagnostics, the callbacks) build keys with the
names below and readers (reports, W&B panels, the callbacks' summaries) look them up with the same names, so a
renamed key is renamed once.

Step convention: a metrics record's ``step`` is the optimizer step whose batch the estimate used, counted from 1
after that step's update (the 4th ``optimizer.step()`` is step 4); ``curv/step`` carries the same number into the
frameworks' loggers, whose own step counters differ.

Keys, ``<layer>`` a layer's name (:class:`curvopt.estimators.layers.Layer`), ``<series>`` a monitored series (a
layer, ``aggregate`` or ``gradient``):
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

PREFIX = "curv/"
STEP = "curv/step"
LOSS = "curv/loss"
PROBES = "curv/probes"
ALARM = "curv/alarm"
SKIPPED = "curv/skipped_estimates"
SKIP_REASON = "curv/skip_reason"
MONITOR_READY = "curv/monitor_ready"
MONITOR_PER_LAYER = "curv/monitor_per_layer"
PHI = "curv/phi"
PHI_SE = "curv/phi_se"
INTER_LAYERS = "curv/inter_layers"
RESONANCE = "curv/resonance"
COUPLING = "curv/coupling"
TRACE_HEATMAP = "curv/trace_heatmap"
EVENTS = "curv/events"

PER_LAYER = {
    "trace": "Hutchinson estimate of tr(H_ll), the layer's Hessian trace",
    "trace_se": "its standard error over the K probes",
    "frob": "‖H_l,:‖_F² / d_l, the layer's row-block Frobenius norm per parameter (the monitor's signal)",
    "grad_sq": "‖∇_l L‖², the layer's squared loss gradient",
    "gn_trace": "tr(G_ll), the Gauss-Newton part of the trace",
    "tensor_trace": "tr(H_ll) − tr(G_ll), the part from the network's own curvature",
    "gn_gap": "‖H^T_l,:‖_F / ‖G_l,:‖_F (0: H = G; > 1: the tensor part dominates)",
    "gn_gap_trace": "|tr(H^T_ll)| / tr(G_ll)",
    "lr_scale": "the learning-rate scale the LR policy set for the layer",
    "top_eig": "the layer's top Hessian eigenvalue (Lanczos; inter_every)",
    "stable_rank": "the layer's stable rank ‖H_ll‖_F² / λ_max² (inter_every)",
}
"""``curv/<quantity>/<layer>``: per-layer quantities."""
TOTALS = {
    "trace": "tr(H) over all layers",
    "trace_se": "its standard error",
    "frob": "‖H‖_F² / P, the mean squared Hessian eigenvalue",
    "grad_sq": "‖∇L‖²",
    "gn_trace": "tr(G)",
    "gn_gap": "‖H^T‖_F / ‖G‖_F",
}
"""``curv/total/<quantity>``: model-wide quantities."""
SCALARS = {
    STEP: "the estimate's optimizer step (for frameworks' loggers)",
    LOSS: "the loss of the curvature sub-batch at the estimate",
    PROBES: "K, the probes of the estimate",
    ALARM: "1 when the estimate raised a memorisation alarm, else 0",
    SKIPPED: "estimates skipped so far (a NaN loss, a failed product)",
    SKIP_REASON: "why the last one was skipped",
    MONITOR_READY: "1 once the CUSUM monitor is calibrated",
    MONITOR_PER_LAYER: "1 when every layer's series decides (alarm_on='layer')",
    "curv/cusum/threshold": "the deciding series' threshold",
    "curv/cusum/gradient_threshold": "the gradient-norm series' threshold",
    PHI: "cross-block curvature mass Φ (inter_every)",
    PHI_SE: "its standard error",
    INTER_LAYERS: "the layers of the inter-layer maps, in order",
    RESONANCE: "the resonance map R(v, w) = ‖H_vw‖_F (a matrix)",
    COUPLING: "the coupling map (a matrix)",
    TRACE_HEATMAP: "W&B only: the per-layer trace heatmap image",
    EVENTS: "W&B only: the table of run events",
}
"""Single keys."""
CUSUM = "curv/cusum/{series}"
"""``curv/cusum/<series>``: the CUSUM statistic S of a monitored series."""


def per_layer(quantity: str, layer: str) -> str:
    """``curv/<quantity>/<layer>``; ``quantity`` one of :data:`PER_LAYER`."""
    if quantity not in PER_LAYER:
        raise KeyError(f"no per-layer quantity {quantity!r}; the schema has {', '.join(PER_LAYER)}")
    return f"{PREFIX}{quantity}/{layer}"


def total(quantity: str) -> str:
    """``curv/total/<quantity>``; ``quantity`` one of :data:`TOTALS`."""
    if quantity not in TOTALS:
        raise KeyError(f"no model-wide quantity {quantity!r}; the schema has {', '.join(TOTALS)}")
    return f"{PREFIX}total/{quantity}"


def cusum(series: str) -> str:
    """``curv/cusum/<series>``."""
    return CUSUM.format(series=series)


def prefixed(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"curv/" + key: value}`` for a record of unprefixed keys (an estimate's ``to_dict()``, the monitor's
    ``statistics()``)."""
    return {f"{PREFIX}{key}": value for key, value in values.items()}


def layer_prefix(quantity: str) -> str:
    """``curv/<quantity>/``, the head of a per-layer quantity's keys (``"cusum"``: the CUSUM statistics)."""
    return CUSUM.format(series="") if quantity == "cusum" else per_layer(quantity, "")


def layer_values(record: Mapping[str, Any], quantity: str) -> dict[str, Any]:
    """``{layer: value}`` of one per-layer quantity (or ``"cusum"``) in a metrics record."""
    head = layer_prefix(quantity)
    return {key.removeprefix(head): value for key, value in record.items() if key.startswith(head)}


def has_layers(record: Mapping[str, Any]) -> bool:
    """Whether a metrics record carries an estimate's per-layer traces."""
    head = per_layer("trace", "")
    return any(key.startswith(head) for key in record)


_PATTERN = re.compile(rf"^{re.escape(PREFIX)}(?:(?:{'|'.join(PER_LAYER)})/.+|total/(?:{'|'.join(TOTALS)})|cusum/.+)$")


def unknown_keys(keys: Iterable[str]) -> list[str]:
    """The ``curv/…`` keys the schema does not name (a writer out of step with the readers)."""
    return [k for k in keys if k.startswith(PREFIX) and k not in SCALARS and not _PATTERN.match(k)]


def describe() -> str:
    """Every key and its meaning, one per line."""
    lines = [f"{key}: {meaning}" for key, meaning in SCALARS.items()]
    lines += [f"curv/{q}/<layer>: {meaning}" for q, meaning in PER_LAYER.items()]
    lines += [f"curv/total/{q}: {meaning}" for q, meaning in TOTALS.items()]
    lines.append(f"{CUSUM.format(series='<series>')}: the CUSUM statistic S of a layer, 'aggregate' or 'gradient'")
    return "\n".join(lines)
