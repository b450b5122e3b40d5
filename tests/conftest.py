"""Test-process settings (threads, W&B offline) and the shared fixtures; helpers live in ``tests/helpers``."""

from __future__ import annotations

import os

# One intra-op thread per test process, set before torch loads its thread pool. pytest-xdist runs
# two test processes (pyproject.toml), and DDP workers and CLI subprocesses inherit this: on a busy
# 2-core machine, spinning OpenMP teams of several threads per process slow the suite down 3-4x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from torch import nn  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


from helpers import bn_cnn, mlp  # noqa: E402


@pytest.fixture
def mlp_problem():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    return model, nn.CrossEntropyLoss(), (x, y)


@pytest.fixture
def cnn_problem():
    torch.manual_seed(1)
    model = bn_cnn()
    # some steps so BN running stats differ from batch stats (makes the train/eval difference real)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 2, 5, 5) * 2 + 1)
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 4, (8,))
    return model, nn.CrossEntropyLoss(), (x, y)
