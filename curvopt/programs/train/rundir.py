"""One live run per run directory, and a fresh run never writes into another run's files.

* A fresh run (no ``--resume``) claims its directory with an atomic ``mkdir``: when
  ``runs/train/demo`` already exists, it writes to ``demo-1``, ``demo-2``, … instead (timm's output
  naming), so two runs started at once never share a directory.
* The live run holds an exclusive ``flock`` on ``RUN_DIR/.lock`` (its pid written inside) for as long
  as it runs. The operating system releases the lock when the process ends, also on ``kill -9``, so a
  killed run never leaves the directory stuck; a second run that wants the directory (a resume
  while the run is alive) is refused with a one-line error naming the pid.
* A run that fails before it starts (bad arguments, unwritable output) removes the directory it
  created, so no empty ``args.yaml`` or JSONL is left behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import IO

from .errors import TrainError

LOCK = ".lock"


def _describe_os_error(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device holding {path}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {path}: permission denied (read-only?)"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(exc, (NotADirectoryError, FileExistsError)):
        return f"{path} (or a parent of it) is a file, not a directory"
    return f"cannot create {path}: {exc.strerror or exc}"


def make_dir(path: Path) -> None:
    """``mkdir -p`` that must end in a writable directory; a one-line :class:`TrainError` otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainError(f"--output: {_describe_os_error(path, exc)}") from None
    if not os.access(path, os.W_OK):
        raise TrainError(f"--output: cannot write to {path}: permission denied (read-only?)")


def claim_fresh_dir(wanted: Path) -> tuple[Path, bool]:
    """Create ``wanted`` (or ``wanted-1``, ``wanted-2``, … when taken) atomically; returns ``(dir, renamed)``."""
    make_dir(wanted.parent)
    for index in range(10_000):
        candidate = wanted if index == 0 else wanted.with_name(f"{wanted.name}-{index}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise TrainError(f"--output: {_describe_os_error(candidate, exc)}") from None
        return candidate, index > 0
    raise TrainError(f"--output: no free run directory name next to {wanted}")


class RunDirLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``, released on :meth:`release` or when the process dies."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        try:
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise TrainError(f"run dir: {_describe_os_error(self.path.parent, exc)}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise TrainError(
                f"run dir {self.path.parent} is in use by a live run (pid {owner}); wait for it to finish, "
                "or pass --output/--experiment for a new directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def remove_unstarted(run_dir: Path) -> None:
    """Remove a directory this process created for a run that never started (only our own files)."""
    shutil.rmtree(run_dir, ignore_errors=True)
