"""The log schema names every key the writers write: a run's JSONL records hold no ``curv/…`` key it does not
know, and the readers find what the writers wrote through the same names."""

from __future__ import annotations

import torch
from helpers import mlp
from torch import nn

from curvopt import CurvatureAwareOptimizer, read_jsonl
from curvopt.control import log_schema
from curvopt.reporting.loggers import JsonlLogger


def test_every_key_a_run_writes_is_in_the_schema(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    log = JsonlLogger(tmp_path / "curvature.jsonl")
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model,
        nn.CrossEntropyLoss(),
        every=1,
        probes=2,
        inter_every=2,
        spectrum_steps=3,
        lr_scaling="trust",
        logger=log,
    )
    for _ in range(4):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step(batch=(x, y))
    log.close()
    records = [r for r in read_jsonl(tmp_path / "curvature.jsonl") if r["type"] == "metrics"]
    keys = {k for r in records for k in r}
    assert log_schema.unknown_keys(keys) == []
    wanted = {log_schema.LOSS, log_schema.ALARM, log_schema.PHI, log_schema.total("gn_gap")}
    assert wanted | {log_schema.cusum("aggregate")} <= keys
    written = {q for q in log_schema.PER_LAYER for r in records if log_schema.layer_values(r, q)}
    assert written >= {"trace", "gn_gap", "lr_scale", "top_eig"}


def test_a_key_out_of_the_schema_is_reported():
    assert log_schema.unknown_keys(["curv/trcae/0", "curv/total/trace", "train/loss", "curv/cusum/3"]) == [
        "curv/trcae/0"
    ]
    assert "curv/gn_gap/<layer>" in log_schema.describe()
