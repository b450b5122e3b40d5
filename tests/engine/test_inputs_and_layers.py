"""Bad input gets a clear error; layers are the parameters each module owns directly; the K* tracker recovers
known variances."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import TiedMLP, bn_cnn, mlp
from torch import nn

from curvopt import (
    ROOT_LAYER,
    CurvatureEstimate,
    CurvatureInputError,
    NonFiniteCurvatureError,
    ProbeBudgetTracker,
    estimate_curvature,
    group_parameters,
    read_jsonl,
)
from curvopt.programs.cli import main as cli_main


@pytest.fixture
def problem():
    torch.manual_seed(0)
    return mlp(), nn.CrossEntropyLoss(), (torch.randn(6, 6), torch.randint(0, 3, (6,)))


@pytest.mark.parametrize("probes", [0, -1, 1.5, True, "8"])
def test_bad_probe_count(problem, probes):
    with pytest.raises(ValueError, match="probes must be an integer >= 1"):
        estimate_curvature(*problem, probes=probes)


def test_bad_distribution_and_strategy(problem):
    with pytest.raises(ValueError, match="distribution"):
        estimate_curvature(*problem, distribution="uniform")
    with pytest.raises(ValueError, match="strategy"):
        estimate_curvature(*problem, strategy="magic")


def test_no_trainable_parameters(problem):
    model, loss_fn, batch = problem
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        estimate_curvature(model, loss_fn, batch)


def test_non_scalar_loss(problem):
    model, _, batch = problem
    with pytest.raises(ValueError, match="scalar"):
        estimate_curvature(model, nn.CrossEntropyLoss(reduction="none"), batch)


def test_batch_model_cannot_take(problem):
    model, loss_fn, _ = problem
    with pytest.raises(CurvatureInputError, match=r"shape \(6, 7\)"):
        estimate_curvature(model, loss_fn, (torch.randn(6, 7), torch.randint(0, 3, (6,))))
    with pytest.raises(CurvatureInputError, match="pair"):
        estimate_curvature(model, loss_fn, torch.randn(6, 6))


def test_nan_loss_is_named(problem):
    model, loss_fn, (x, y) = problem
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss"):
        estimate_curvature(model, loss_fn, (x, y))


class _NanBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class _PoisonedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(_NanBackward.apply(torch.tanh(self.body(x))))


def test_nan_products_name_the_layers():
    torch.manual_seed(1)
    model = _PoisonedHead()
    with pytest.raises(NonFiniteCurvatureError, match="body") as info:
        estimate_curvature(
            model, nn.CrossEntropyLoss(), (torch.randn(5, 4), torch.randint(0, 2, (5,))), strategy="autograd", probes=2
        )
    assert "body" in info.value.layers  # the head row is NaN too, through the cross-block H_head,body


def test_default_grouping_names_and_tied_weights():
    layers = group_parameters(bn_cnn())
    assert [layer.name for layer in layers] == ["0", "1", "5"]
    assert layers[1].param_names == ("1.weight", "1.bias")
    tied = group_parameters(TiedMLP())
    assert sum(layer.numel for layer in tied) == sum(p.numel() for p in TiedMLP().parameters())


def test_root_parameters_and_frozen_parameters():
    class WithRoot(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.lin = nn.Linear(2, 2)
            self.frozen = nn.Linear(2, 2).requires_grad_(False)

        def forward(self, x):
            return self.frozen(self.lin(x) * self.scale)

    layers = group_parameters(WithRoot())
    assert [layer.name for layer in layers] == [ROOT_LAYER, "lin"]


def test_custom_grouping_errors():
    model = mlp()
    with pytest.raises(ValueError, match="neither a parameter nor a module"):
        group_parameters(model, {"a": ["nope"]})
    with pytest.raises(ValueError, match="exactly one layer"):
        group_parameters(model, {"a": ["0.weight"], "b": ["0"]})
    groups = group_parameters(model, {"first": ["0"], "rest": [model[2], "4.weight", "4.bias"]})
    assert [g.numel for g in groups] == [6 * 8 + 8, 8 * 5 + 5 + 5 * 3 + 3]


def _fake_estimate(samples: torch.Tensor) -> CurvatureEstimate:
    return CurvatureEstimate(layers=["a", "b"], numel={"a": 1, "b": 1}, samples={"trace": samples})


def test_probe_budget_tracker_recovers_known_components():
    """Per-probe values ~ N(tr_B, v) with tr_B ~ N(μ, σ²): the tracker recovers v, σ² and K* = v/σ²."""
    gen = torch.Generator().manual_seed(0)
    v = torch.tensor([4.0, 1.0])
    sigma2 = torch.tensor([0.5, 0.05])
    tracker = ProbeBudgetTracker(window=400)
    for _ in range(400):
        tr_b = 3.0 + sigma2.sqrt() * torch.randn(2, generator=gen)
        samples = tr_b + v.sqrt() * torch.randn(8, 2, generator=gen)
        tracker.update(_fake_estimate(samples.double()))
    comps = tracker.components()
    for i, name in enumerate(["a", "b"]):
        assert comps[name]["probe_var"] == pytest.approx(float(v[i]), rel=0.08)
        assert comps[name]["batch_var"] == pytest.approx(float(sigma2[i]), rel=0.35)
        assert comps[name]["k_star"] == pytest.approx(float(v[i] / sigma2[i]), rel=0.4)
    assert tracker.suggest_probes(low=2, high=64) == math.ceil(sorted(c["k_star"] for c in comps.values())[1])


def test_probe_budget_tracker_input_errors():
    tracker = ProbeBudgetTracker()
    with pytest.raises(RuntimeError):
        tracker.components()
    with pytest.raises(ValueError, match="at least 2 probes"):
        tracker.update(_fake_estimate(torch.zeros(1, 2, dtype=torch.float64)))


def test_cli_version_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["--version"])
    assert info.value.code == 0
    assert "curvopt" in capsys.readouterr().out
    assert cli_main([]) == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_demo_fires_the_alarm_after_the_switch(capsys, tmp_path):
    """The README's main job, at its default settings: exit 0 means the alarm fired after the label switch."""
    assert cli_main(["demo", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ALARM" in out and "gn_gap" in out and "cusum" in out
    assert "lr_scale" not in out  # no scaling in the demo, so no column for it
    # the rollback a user would get, without a validation split: a model from before the switch, not the memoriser
    said = re.search(
        r"scores ([\d.]+) % on 1,024 held-out images with clean labels; the model the run ended with, "
        r"([\d.]+) %",
        out,
    )
    assert said and float(said[1]) > 90 > 20 > float(said[2]), out
    records = read_jsonl(tmp_path / "curvature.jsonl")
    assert any(r["type"] == "alarm" and r["step"] > 400 for r in records)
    assert sum(r["type"] == "metrics" for r in records) == 40
    # where the W&B run, the JSONL log and the plots went
    assert "W&B run:" in out and "JSONL log:" in out and "plots:" in out
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    figures = {p.name for p in (tmp_path / "report").glob("*.png")}
    assert figures >= {"curvature_heatmap.png", "cusum.png", "training.png"}


def test_cli_demo_bad_arguments(capsys):
    assert cli_main(["demo", "--steps", "2"]) == 2
    assert "--steps must be" in capsys.readouterr().err
