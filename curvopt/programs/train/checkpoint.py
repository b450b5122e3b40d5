"""Checkpoints of ``curvopt train``: written atomically, verified when read, one-line errors.

* **Atomic**: the state goes to a temporary file named for this process, then ``os.replace`` puts
  it in place; a kill mid-write leaves the previous checkpoint intact. A failed write (a full
  disk) removes its temporary file and says so in one line.
* **Verified**: ``torch.save`` writes a zip archive whose every entry carries a CRC-32; ``torch.load``
  does not check them, so random bytes inside tensor data would load as garbage weights.
  :func:`load_checkpoint` checks every entry's CRC first (≈ 30 ms for 50 MB) and refuses a
  corrupted file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from ...control.rollback import pick_before, thin_log_spaced
from .errors import TrainError

CHECKPOINT = "last.pth.tar"
BEST = "model_best.pth.tar"


class CheckpointError(TrainError):
    """A checkpoint that cannot be read or written; the message is one line."""


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "unexpected pos" in str(exc) or "No space left" in str(exc)  # torch's zip writer on a short write


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically; a failure removes its partial file and raises ``CheckpointError``."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(exc):
            raise CheckpointError(
                f"no space left on the device to write {path} (the previous checkpoint is "
                "intact; free space and --resume it)"
            ) from None
        raise CheckpointError(f"could not write {path}: {type(exc).__name__}: {exc}") from None


def verify_checkpoint(path: Path) -> None:
    """Check the CRC-32 of every entry of a ``torch.save`` archive; raise :class:`CheckpointError` when one fails."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return  # not a zip archive (legacy format): torch.load decides
    except OSError as exc:
        raise CheckpointError(f"--resume {path}: cannot read it ({exc.strerror or exc})") from None
    if bad is not None:
        raise CheckpointError(
            f"--resume {path}: the checkpoint is corrupted (checksum mismatch in {bad}); "
            "use an earlier copy (model_best.pth.tar?)"
        )


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint ``--resume`` means: the file itself, or a run directory's ``last.pth.tar``."""
    path = Path(path)
    if path.is_dir():
        if (path / CHECKPOINT).is_file():
            return path / CHECKPOINT
        raise CheckpointError(
            f"--resume {path}: a directory without {CHECKPOINT}; pass a run directory or a "
            f"checkpoint file ({CHECKPOINT}, {BEST})"
        )
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A verified checkpoint (a file, or a run directory's ``last.pth.tar``), or a one-line :class:`CheckpointError`."""
    path = checkpoint_path(path)
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"--resume {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch"} <= set(state):
        raise CheckpointError(f"--resume {path}: not a curvopt train checkpoint (no model/optimizer/epoch)")
    return state


RING = "ring-{epoch}-u{updates}.pth.tar"


RING_SCORES = "ring-scores.json"
"""The ring checkpoints' validation top-1, by file name (``--rollback-to best-validated`` reads it)."""


def keep_in_ring(run_dir: Path, epoch: int, updates: int, keep: int, score: float | None = None) -> None:
    """``--on-alarm rollback``: this epoch's checkpoint also as ``ring-<epoch>-u<updates>.pth.tar`` (a hard link to
    ``last.pth.tar`` where the file system has them), ``keep`` of them kept, log-spaced back to the first
    (:func:`curvopt.control.rollback.thin_log_spaced`); ``score`` (the epoch's validation top-1) is noted in
    ``ring-scores.json``."""
    ring = run_dir / RING.format(epoch=epoch + 1, updates=updates)
    ring.unlink(missing_ok=True)
    try:
        os.link(run_dir / CHECKPOINT, ring)
    except OSError:
        shutil.copyfile(run_dir / CHECKPOINT, ring)
    ring_files = sorted(run_dir.glob("ring-*.pth.tar"), key=_ring_epoch)
    while len(ring_files) > max(keep, 1):
        drop = thin_log_spaced([_ring_updates(p) for p in ring_files], updates) if keep >= 3 else 0
        ring_files.pop(drop).unlink(missing_ok=True)
    kept = {p.name for p in run_dir.glob("ring-*.pth.tar")}
    scores = {k: v for k, v in _ring_scores(run_dir).items() if k in kept}
    if score is not None:
        scores[ring.name] = float(score)
    tmp = run_dir / f"{RING_SCORES}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(scores))
    os.replace(tmp, run_dir / RING_SCORES)


def _ring_scores(run_dir: Path) -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads((run_dir / RING_SCORES).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _ring_epoch(path: Path) -> int:
    return int(path.name.removeprefix("ring-").split("-u")[0])


def _ring_updates(path: Path) -> int:
    return int(path.name.split("-u")[1].removesuffix(".pth.tar"))


def ring_before(run_dir: Path, update: int, choose: str = "onset") -> tuple[Path, dict[str, Any]] | None:
    """The latest ring checkpoint taken before optimizer update ``update`` (``choose="best-validated"``: the one with
    the best validation top-1 among them, the latest of equals); the oldest one when none is before it; ``None``
    when the ring is empty. Loaded."""
    ring = sorted(run_dir.glob("ring-*.pth.tar"), key=_ring_epoch)
    scores = _ring_scores(run_dir)
    index = pick_before([_ring_updates(p) for p in ring], [scores.get(p.name) for p in ring], update, choose)
    return None if index is None else (ring[index], load_checkpoint(ring[index]))


def remove_stale_temporaries(run_dir: Path) -> None:
    """Partial checkpoints of killed runs (``*.tmp.<pid>``); called while holding the run directory's lock."""
    for tmp in run_dir.glob("*.pth.tar.tmp*"):
        tmp.unlink(missing_ok=True)
