"""The estimators as functions of an operator, against the dense float64 blocks of a small model."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_curvature, layer_params
from torch import nn

import curvopt
from curvopt.estimators.of_operator import layer_diagonals, layer_top_eigenvalues, layer_traces


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    loss_fn, batch = nn.CrossEntropyLoss(), (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    return model, loss_fn, batch, dense_curvature(model, loss_fn, batch, layer_params(model))


def test_layer_traces_agree_with_the_dense_blocks_within_their_standard_error(problem):
    model, loss_fn, batch, dense = problem
    with curvopt.curvature_operator(model, loss_fn, batch, gn=True, strategy="autograd") as op:
        h, g = layer_traces(op, 400, generator=torch.Generator().manual_seed(1), gn=True)
        single = layer_traces(op, 1, generator=torch.Generator().manual_seed(1))
    for name in ("0", "2"):
        exact_h = float(torch.trace(dense.block(dense.H, name)))
        exact_g = float(torch.trace(dense.block(dense.G, name)))
        assert abs(h.value[name] - exact_h) < 4 * h.se[name], name
        assert abs(g.value[name] - exact_g) < 4 * g.se[name] + 1e-9, name
        assert h.se[name] > 0 and h.probes == 400
    assert all(v != v for v in single.se.values())  # one probe: no standard error (NaN), not a made-up one


def test_layer_diagonals_agree_coordinate_by_coordinate(problem):
    model, loss_fn, batch, dense = problem
    with curvopt.curvature_operator(model, loss_fn, batch, strategy="autograd") as op:
        diag = layer_diagonals(op, 300, generator=torch.Generator().manual_seed(2))
    errors = []
    for name in ("0", "2"):
        exact = torch.diagonal(dense.block(dense.H, name))
        se = diag.se[name]
        assert diag.value[name].shape == exact.shape
        errors += ((diag.value[name] - exact).abs() / se.clamp_min(1e-12))[se > 1e-9].tolist()
    within = sum(e < 2 for e in errors) / len(errors)
    assert 0.85 < within <= 1.0, within  # about 95 % of coordinates within 2 SE
    assert max(errors) < 6


def test_layer_top_eigenvalues_match_the_dense_blocks(problem):
    model, loss_fn, batch, dense = problem
    with curvopt.curvature_operator(model, loss_fn, batch, strategy="autograd") as op:
        top = layer_top_eigenvalues(op, steps=100)
        with pytest.raises(ValueError, match="steps must be >= 1"):
            layer_top_eigenvalues(op, steps=0)
        with pytest.raises(ValueError, match="gn=True"):
            layer_traces(op, 2, gn=True)
    for name in ("0", "2"):
        exact = float(torch.linalg.eigvalsh(dense.block(dense.H, name)).max())
        assert top[name] == pytest.approx(exact, rel=1e-5, abs=1e-8), name
