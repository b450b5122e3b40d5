"""``curvature_dtype``: bf16 products stay within a fraction of the estimator's standard error of the fp32
estimate on the same probes (and do change the numbers: the option is not a no-op), TF32 is a CUDA-only
request that leaves CPU products in fp32 with a warning, bad names fail early, and the caller's autocast
and backend flags are restored. The CUDA counterparts live in test_cuda.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import LayerNormGELU
from torch import nn

from curvopt import CurvatureAwareOptimizer, estimate_curvature
from curvopt.engine.context import resolve_curvature_dtype


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("given", "name"),
    [(None, None), ("bf16", "bfloat16"), (torch.bfloat16, "bfloat16"), (torch.float32, "float32"), ("tf32", "tf32")],
)
def test_names_and_dtypes_resolve(given, name):
    assert resolve_curvature_dtype(given) == name


@pytest.mark.parametrize(("given", "match"), [("float16", "overflow"), (torch.float16, "overflow"), ("int8", "one of")])
def test_bad_precisions_fail_before_any_product(cnn_problem, given, match):
    model, loss_fn, batch = cnn_problem
    with pytest.raises(ValueError, match=match):
        estimate_curvature(model, loss_fn, batch, probes=2, curvature_dtype=given)
    with pytest.raises(ValueError, match=match):
        CurvatureAwareOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, loss_fn, curvature_dtype=given)


@pytest.fixture(scope="module")
def ln_problem():
    torch.manual_seed(3)
    model = LayerNormGELU(d_in=12, width=32, classes=5)
    batch = (torch.randn(64, 12), torch.randint(0, 5, (64,)))
    return model, nn.CrossEntropyLoss(), batch


@pytest.mark.parametrize("strategy", ["autograd", "func"])
@pytest.mark.parametrize("problem", ["cnn_problem", "ln_problem"])
def test_bf16_products_stay_within_a_fraction_of_the_standard_error(request, problem, strategy):
    model, loss_fn, batch = request.getfixturevalue(problem)
    fp32 = estimate_curvature(model, loss_fn, batch, probes=16, generator=_gen(), strategy=strategy)
    bf16 = estimate_curvature(
        model, loss_fn, batch, probes=16, generator=_gen(), strategy=strategy, curvature_dtype="bfloat16"
    )
    assert bf16.curvature_dtype == "bfloat16" and fp32.curvature_dtype is None
    assert not torch.equal(fp32.samples["trace"], bf16.samples["trace"])  # the products really ran in bf16
    for layer in fp32.layers:
        # measured 0.02-0.12 SE on these models and 0.1 SE on resnet18 (benchmarks/RESULTS.md)
        assert abs(bf16.trace[layer] - fp32.trace[layer]) <= 0.5 * fp32.trace_se[layer], layer
        assert abs(bf16.gn_trace[layer] - fp32.gn_trace[layer]) <= 0.5 * fp32.gn_trace_se[layer], layer


def test_bf16_leaves_the_callers_autocast_as_it_was(cnn_problem):
    model, loss_fn, batch = cnn_problem
    with torch.autocast("cpu", dtype=torch.float16):
        estimate_curvature(model, loss_fn, batch, probes=2, curvature_dtype="bfloat16")
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    assert not torch.is_autocast_enabled("cpu")


def test_bf16_refuses_the_vmapped_strategy_with_a_way_out(cnn_problem):
    model, loss_fn, batch = cnn_problem
    with pytest.raises(ValueError, match="'autograd'"):
        estimate_curvature(model, loss_fn, batch, probes=2, strategy="func-vmap", curvature_dtype="bfloat16")


def test_tf32_on_cpu_warns_and_computes_in_fp32(cnn_problem):
    model, loss_fn, batch = cnn_problem
    fp32 = estimate_curvature(model, loss_fn, batch, probes=4, generator=_gen())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tf32 = estimate_curvature(model, loss_fn, batch, probes=4, generator=_gen(), curvature_dtype="tf32")
    assert any("no effect on cpu" in str(w.message) for w in caught)
    assert torch.equal(fp32.samples["trace"], tf32.samples["trace"])


def test_the_wrapper_passes_the_precision_to_every_estimate(cnn_problem):
    model, loss_fn, (x, y) = cnn_problem
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, loss_fn, every=1, probes=2, curvature_dtype=torch.bfloat16
    )
    assert opt.settings()["curvature_dtype"] == "bfloat16"
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step(batch=(x, y))
    assert opt.last_estimate is not None and opt.last_estimate.curvature_dtype == "bfloat16"
