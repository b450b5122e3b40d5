"""`curvopt train` in a subprocess that can die in the middle of a checkpoint write (tests only).

    python tests/helpers/crash_run.py KILL_ON_SAVE ARGS...

KILL_ON_SAVE = N > 0: on the N-th checkpoint write, write half of the bytes to the temporary file
and SIGKILL this process (what a power cut or `kill -9` during `torch.save` leaves behind).
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

KILL_ON_SAVE = int(sys.argv[1])
_real_save = torch.save
_saves = 0


def _dying_save(obj, f, *args, **kwargs):
    global _saves
    _saves += 1
    if _saves == KILL_ON_SAVE:
        buffer = io.BytesIO()
        _real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_save(obj, f, *args, **kwargs)


torch.save = _dying_save

from curvopt.programs.cli import main  # noqa: E402

raise SystemExit(main(sys.argv[2:]))
