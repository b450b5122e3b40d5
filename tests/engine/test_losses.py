"""Every torch.nn loss that takes (input, target), against dense float64 references, under every strategy.

For each loss: per-layer Hessian traces, Gauss-Newton traces and the GN-Gap with ``gn=True`` are
within 4 reported standard errors of the dense reference (double backward in float64), and the
three strategies return the same per-probe values on the same probes.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import dense_curvature, layer_params
from torch import nn
from torch.nn import functional as F

import curvopt.engine.operator
from curvopt import CurvatureStrategyError, estimate_curvature
from curvopt.engine.products import EXACT_STRATEGIES

Z = 4.0
B, D_IN, C = 12, 4, 3


def _net(out: int = C, final: nn.Module | None = None) -> nn.Module:
    layers = [nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, out)]
    return nn.Sequential(*layers, *([final] if final is not None else []))


def _cases() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    hard = torch.randint(0, C, (B,), generator=g)
    ignored = hard.clone()
    ignored[::4] = -100
    probs = torch.softmax(torch.randn(B, C, generator=g), -1)
    multi = torch.rand(B, C, generator=g) * 2  # unnormalised soft targets (multi-label)
    real = torch.randn(B, C, generator=g)
    binary = (torch.rand(B, C, generator=g) > 0.5).float()
    weight = torch.tensor([0.5, 1.0, 2.0])
    counts = torch.poisson(torch.full((B, C), 2.0), generator=g)

    def gaussian_nll(out, y):
        return F.gaussian_nll_loss(out[:, :1], y, out[:, 1:].exp())

    return {
        "mse": (_net(), nn.MSELoss(), real),
        "l1": (_net(), nn.L1Loss(), real),
        "huber": (_net(), nn.HuberLoss(delta=0.3), real),
        "smooth_l1": (_net(), nn.SmoothL1Loss(beta=0.5), real),
        "bce": (_net(final=nn.Sigmoid()), nn.BCELoss(), probs),
        "bce_with_logits": (_net(), nn.BCEWithLogitsLoss(pos_weight=weight), binary),
        "ce_hard": (_net(), nn.CrossEntropyLoss(), hard),
        "ce_soft": (_net(), nn.CrossEntropyLoss(), probs),
        "ce_soft_unnormalised": (_net(), nn.CrossEntropyLoss(), multi),
        "ce_smoothed": (_net(), nn.CrossEntropyLoss(label_smoothing=0.1), hard),
        "ce_weighted": (_net(), nn.CrossEntropyLoss(weight=weight), hard),
        "ce_ignore_index": (_net(), nn.CrossEntropyLoss(), ignored),
        "nll_after_log_softmax": (_net(final=nn.LogSoftmax(-1)), nn.NLLLoss(), hard),
        "kl_div": (_net(final=nn.LogSoftmax(-1)), nn.KLDivLoss(reduction="batchmean"), probs),
        "poisson_nll": (_net(), nn.PoissonNLLLoss(), counts),
        "gaussian_nll": (_net(out=2), gaussian_nll, real[:, :1]),
    }


CASES = _cases()
ZERO_GN = {"l1", "nll_after_log_softmax", "kl_div"}  # (piecewise) linear in the outputs: G ≡ 0


def _problem(name: str):
    model, loss_fn, targets = CASES[name]
    torch.manual_seed(1)
    for p in model.parameters():
        nn.init.normal_(p, std=0.6)
    x = torch.randn(B, D_IN, generator=torch.Generator().manual_seed(2))
    return model, loss_fn, (x, targets)


@pytest.mark.parametrize("name", list(CASES))
def test_loss_matches_dense_reference_with_gn(name):
    model, loss_fn, batch = _problem(name)
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the zero-GN losses warn (tested below)
        est = estimate_curvature(
            model,
            loss_fn,
            batch,
            probes=3000,
            gn=True,
            strategy="func-vmap",
            chunk_size=500,
            generator=torch.Generator().manual_seed(3),
        )
    for layer in est.layers:
        exact_h = float(dense.block(dense.H, layer).trace())
        exact_g = float(dense.block(dense.G, layer).trace())
        assert abs(est.trace[layer] - exact_h) < Z * est.trace_se[layer], f"{name} tr H {layer}"
        if name in ZERO_GN:
            assert exact_g == 0 and est.gn_trace[layer] == 0 and math.isinf(est.gn_gap[layer]), name
            continue
        assert abs(est.gn_trace[layer] - exact_g) < Z * est.gn_trace_se[layer] + 1e-12, f"{name} tr G {layer}"
        i = est.layers.index(layer)
        t, g = est.samples["tensor_row_sq"][:, i], est.samples["gn_row_sq"][:, i]
        exact_gap = float(dense.rows(dense.T, layer).norm() / dense.rows(dense.G, layer).norm())
        rel = 0.5 * (float(t.std()) / float(t.mean()) + float(g.std()) / float(g.mean())) / math.sqrt(est.probes)
        assert abs(est.gn_gap[layer] / exact_gap - 1) < Z * rel, f"{name} gn_gap {layer}"


@pytest.mark.parametrize("name", list(CASES))
def test_every_strategy_runs_every_loss_and_they_agree(name):
    model, loss_fn, batch = _problem(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [
            estimate_curvature(
                model, loss_fn, batch, probes=3, gn=gn, strategy=s, generator=torch.Generator().manual_seed(4)
            )
            for gn in (True, False)
            for s in EXACT_STRATEGIES
        ]
    for other in results[1:3]:
        for kind in other.samples:
            torch.testing.assert_close(other.samples[kind], results[0].samples[kind], rtol=1e-4, atol=1e-6)
    for other in results[4:]:
        torch.testing.assert_close(other.samples["trace"], results[3].samples["trace"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[3].samples["trace"], results[0].samples["trace"], rtol=1e-4, atol=1e-6)


def test_log_softmax_with_nll_warns_once_that_the_gauss_newton_part_is_zero(monkeypatch):
    monkeypatch.setattr(curvopt.engine.operator, "_warned", set())
    model, loss_fn, batch = _problem("nll_after_log_softmax")
    with pytest.warns(RuntimeWarning, match="return the logits") as record:
        for _ in range(3):
            estimate_curvature(model, loss_fn, batch, probes=2)
    assert sum("NLLLoss" in str(w.message) for w in record) == 1
    est = estimate_curvature(model, loss_fn, batch, probes=2, gn=False)  # no GN asked for: nothing to say
    assert not est.has_gn


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_lstm_forward_mode_gap_names_the_module_and_auto_works():
    torch.manual_seed(5)
    model = _Recurrent()
    batch = (torch.randn(5, 7, 4), torch.randint(0, 3, (5,)))
    est = estimate_curvature(model, nn.CrossEntropyLoss(), batch, probes=2)  # auto: reverse mode only
    assert est.strategy == "autograd" and math.isfinite(est.total_trace)
    for strategy in ("func", "func-vmap"):
        with pytest.raises(CurvatureStrategyError, match=r"module 'lstm' \(LSTM\).*strategy='autograd'"):
            estimate_curvature(model, nn.CrossEntropyLoss(), batch, probes=2, strategy=strategy)
