"""Read the records of an offline W&B run file (``run-<id>.wandb``) without the network.

The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a
7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last). Every record is a
``wandb_internal_pb2.Record`` protobuf. Only used to check what a run wrote.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: str | Path, wait_s: float = 20.0) -> list[Any]:
    """Every record of an offline run file. The writer (wandb-core, another process) may still be
    flushing when ``finish()`` returns on a busy machine: re-read until the run's ``exit`` record is
    there, for up to ``wait_s`` seconds, then return what the file holds."""
    deadline = time.monotonic() + wait_s
    while True:
        records = _parse(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _parse(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:  # block padding
            pos += room
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    parsed = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def run_file(run_dir: str | Path) -> Path:
    """The single ``run-*.wandb`` file of an offline run directory (``…/wandb/offline-run-…``)."""
    files = list(Path(run_dir).glob("run-*.wandb"))
    assert len(files) == 1, f"expected one run file in {run_dir}, found {files}"
    return files[0]


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def summary(records: list[Any]) -> dict[str, Any]:
    """The run's final summary: the last logged value of every key (history rows, as W&B derives its
    default summary), updated by the summary records. The history rows are read too because the
    offline writer may flush the final summary record late or in pieces under load."""
    out: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                out[_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                out[_key(item)] = json.loads(item.value_json)
    return out


def config(records: list[Any]) -> dict[str, Any]:
    """The run's config: what ``wandb.init(config=…)`` set (the run record) plus later updates."""
    out: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in updates:
            value = json.loads(item.value_json)
            out[_key(item)] = value.get("value", value) if isinstance(value, dict) and "value" in value else value
    return out


def alerts(records: list[Any]) -> list[Any]:
    return [r.alert for r in records if r.WhichOneof("record_type") == "alert"]


def offline_runs(parent: str | Path) -> list[Path]:
    return sorted(Path(parent).glob("**/wandb/offline-run-*"))
