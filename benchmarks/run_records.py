"""Recorded runs of the memorisation study: one gzip JSON per run, written atomically (a killed recording leaves no
partial file and resumes where it stopped), read back with the signals derived from them."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any


def _rounded(value: Any) -> Any:
    """Floats to 7 significant digits (the records' precision), recursively: half the bytes, same analysis."""
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def save_run(path: Path, result: dict) -> None:
    """One run's record as gzip-compressed JSON (≈ 60 kB), written atomically: a killed recording leaves no
    partial file, so ``record`` resumes where it stopped (runs already on disk are skipped)."""
    import gzip
    import os

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(_rounded(result), f)
    os.replace(tmp, path)


def read_run(path: Path) -> dict:
    import gzip

    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    return json.loads(path.read_text())


def geometric_mean(values: dict[str, float]) -> float:
    """exp(mean_l log v_l): every layer weighs the same, whatever its size or curvature."""
    logs = [math.log(v) for v in values.values() if v > 0]
    return math.exp(statistics.fmean(logs)) if logs else float("nan")


def load_runs(directory: Path, seeds: range | None = None) -> list[dict]:
    files = sorted([*directory.glob("*.json"), *directory.glob("*.json.gz")])
    runs = [read_run(p) for p in files if "_rollback-" not in p.name]
    runs = [r for r in runs if seeds is None or r["seed"] in seeds]
    for run in runs:  # derived signals, computed from the recorded per-layer values
        run["series"]["geo_frob"] = [geometric_mean(v) for v in run["series"]["layer_frob"]]
    return runs
