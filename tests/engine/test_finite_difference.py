"""``strategy="finite-difference"``: against dense float64 references and the exact products on the same probes,
its self-check, the state it must leave alone, and ``"auto"`` falling back to it where double backward cannot go."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import LayerNormGELU, TiedMLP, TinyAttention, dense_curvature, layer_params, mlp
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

import curvopt
from curvopt import (
    CurvatureAwareOptimizer,
    CurvatureInputError,
    DoubleBackwardError,
    FiniteDifferenceWarning,
    block_norms,
    estimate_curvature,
    layer_spectrum,
)

Z = 4.0  # tolerance in reported standard errors
FD = "finite-difference"


def _gelu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5), nn.SiLU(), nn.Linear(5, 3))


def _smooth(name: str):
    torch.manual_seed({"tanh_mlp": 0, "gelu_mlp": 1, "layernorm_gelu": 2, "attention": 3, "tied": 4}[name])
    if name == "attention":
        return TinyAttention(), nn.CrossEntropyLoss(), (torch.randn(6, 3, 4), torch.randint(0, 3, (6,)))
    model = {"tanh_mlp": mlp, "gelu_mlp": _gelu_mlp, "layernorm_gelu": LayerNormGELU, "tied": TiedMLP}[name]()
    d_in = {"tanh_mlp": 6, "gelu_mlp": 6, "layernorm_gelu": 5, "tied": 5}[name]
    if name == "layernorm_gelu":
        with torch.no_grad():  # a non-trivial affine LayerNorm
            model.norm.weight.uniform_(0.5, 1.5)
            model.norm.bias.normal_(0, 0.3)
    return model, nn.CrossEntropyLoss(), (torch.randn(10, d_in), torch.randint(0, 3, (10,)))


SMOOTH = ["tanh_mlp", "gelu_mlp", "layernorm_gelu", "attention", "tied"]


def _relu_pool_cnn() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 4),
    )


@pytest.fixture(scope="module", params=SMOOTH)
def smooth_fd(request):
    """(finite-difference estimate with K = 1500, dense reference, warnings of the call) for one smooth model."""
    model, loss_fn, batch = _smooth(request.param)
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = estimate_curvature(
            model, loss_fn, batch, probes=1500, strategy=FD, generator=torch.Generator().manual_seed(0)
        )
    return est, dense, [w for w in caught if issubclass(w.category, FiniteDifferenceWarning)]


def _within(estimate: float, se: float, exact: float, what: str) -> None:
    assert se > 0, what
    assert abs(estimate - exact) < Z * se, f"{what}: {estimate:.6g} vs exact {exact:.6g} (se {se:.3g})"


def test_finite_difference_traces_match_dense_blocks(smooth_fd):
    est, dense, caught = smooth_fd
    assert est.strategy == FD
    assert not caught, "a smooth model must pass the self-check"
    for layer in est.layers:
        _within(est.trace[layer], est.trace_se[layer], float(dense.block(dense.H, layer).trace()), f"{layer} tr H")
        _within(
            est.gn_trace[layer], est.gn_trace_se[layer], float(dense.block(dense.G, layer).trace()), f"{layer} tr G"
        )
        _within(
            est.tensor_trace[layer],
            est.tensor_trace_se[layer],
            float(dense.block(dense.T, layer).trace()),
            f"{layer} tr Hᵀ",
        )


def test_finite_difference_row_block_norms_and_gn_gap_match_dense(smooth_fd):
    est, dense, _ = smooth_fd
    k = est.probes
    for i, layer in enumerate(est.layers):
        for kind, matrix in (("hess_row_sq", dense.H), ("gn_row_sq", dense.G), ("tensor_row_sq", dense.T)):
            values = est.samples[kind][:, i]
            exact = float(dense.rows(matrix, layer).square().sum())
            _within(float(values.mean()), float(values.std() / k**0.5), exact, f"{layer} {kind}")
        gap = float(dense.rows(dense.T, layer).norm() / dense.rows(dense.G, layer).norm())
        assert est.gn_gap[layer] == pytest.approx(gap, rel=0.1), layer  # a ratio of two means within a few SEs


@pytest.mark.parametrize("name", SMOOTH)
def test_finite_difference_is_a_small_fraction_of_an_se_from_the_exact_products(name):
    model, loss_fn, batch = _smooth(name)
    runs = {
        s: estimate_curvature(model, loss_fn, batch, probes=32, strategy=s, generator=torch.Generator().manual_seed(1))
        for s in ("autograd", FD)
    }
    exact, fd = runs["autograd"], runs[FD]
    for layer in exact.layers:
        assert abs(fd.trace[layer] - exact.trace[layer]) < 0.05 * exact.trace_se[layer], layer
        assert abs(fd.gn_trace[layer] - exact.gn_trace[layer]) < 0.05 * exact.gn_trace_se[layer], layer
        assert fd.gn_gap[layer] == pytest.approx(exact.gn_gap[layer], rel=1e-2), layer
    assert fd.loss == exact.loss


def test_the_self_check_names_kinked_layers_and_the_exact_strategy():
    model = _relu_pool_cnn()
    batch = (torch.randn(16, 2, 8, 8), torch.randint(0, 4, (16,)))
    with pytest.warns(FiniteDifferenceWarning) as record:
        estimate_curvature(model, nn.CrossEntropyLoss(), batch, probes=2, strategy=FD)
    text = " ".join(str(w.message) for w in record)
    assert "strategy='autograd' (exact; it runs on this model)" in text
    assert "'1' (ReLU)" in text and "'2' (MaxPool2d)" in text
    with pytest.warns(FiniteDifferenceWarning) as record:  # a wide step: many units switch, the numbers show it
        estimate_curvature(
            model,
            nn.CrossEntropyLoss(),
            batch,
            probes=2,
            strategy=FD,
            fd_step=3e-2,
            generator=torch.Generator().manual_seed(0),
        )
    assert "disagree in layer(s) '" in str(record[0].message)  # the numeric check found the kinks, naming layers
    with warnings.catch_warnings():
        warnings.simplefilter("error", FiniteDifferenceWarning)  # fd_check=False: no check, no warning
        estimate_curvature(_relu_pool_cnn(), nn.CrossEntropyLoss(), batch, probes=2, strategy=FD, fd_check=False)


def test_the_self_check_sees_rounding_in_a_bfloat16_model():
    model, loss_fn, batch = _smooth("gelu_mlp")
    model = model.to(torch.bfloat16)
    with pytest.warns(FiniteDifferenceWarning, match="mostly rounding"):
        estimate_curvature(model, loss_fn, (batch[0].bfloat16(), batch[1]), probes=2, strategy=FD)
    with pytest.raises(ValueError, match=r"bfloat16.*finite-difference"):
        estimate_curvature(model, loss_fn, batch, probes=2, strategy=FD, curvature_dtype="bfloat16")


def test_parameters_grads_buffers_and_rng_are_restored_bit_exactly_also_on_exceptions():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))
    batch = (torch.randn(12, 6) * 3 + 1, torch.randint(0, 3, (12,)))
    nn.CrossEntropyLoss()(model(batch[0]), batch[1]).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    calls = {"n": 0}

    def failing_loss(out, y):  # fails in the third pass: inside a perturbed product
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    for loss_fn in (nn.CrossEntropyLoss(), failing_loss):
        try:
            estimate_curvature(model, loss_fn, batch, probes=3, strategy=FD)
        except CurvatureInputError:
            assert loss_fn is failing_loss
        after = model.state_dict()
        for key, value in before.items():
            assert torch.equal(value, after[key]), key  # bitwise: restored from a copy, not θ + εz − εz
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        assert torch.equal(rng, torch.get_rng_state())


def test_dropout_masks_are_the_same_at_theta_and_theta_plus_eps_z():
    """With one mask per estimate the dropout net is smooth: finite differences match the exact products."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3))
    batch = (torch.randn(10, 6), torch.randint(0, 3, (10,)))
    runs = [
        estimate_curvature(
            model, nn.CrossEntropyLoss(), batch, probes=16, strategy=s, generator=torch.Generator().manual_seed(2)
        )
        for s in ("autograd", FD)
    ]
    for layer in runs[0].layers:
        assert abs(runs[1].trace[layer] - runs[0].trace[layer]) < 0.05 * runs[0].trace_se[layer]


def test_block_norms_and_spectra_run_on_finite_differences():
    model, loss_fn, batch = _smooth("tanh_mlp")
    norms = {
        s: block_norms(model, loss_fn, batch, probes=8, gn=True, strategy=s, generator=torch.Generator().manual_seed(3))
        for s in ("autograd", FD)
    }
    # squared norms of products whose fp32 rounding is ≈ u/ρ ≈ 6e-4 at the default relative step ρ = 1e-4
    torch.testing.assert_close(norms[FD].squared()[0], norms["autograd"].squared()[0], rtol=3e-3, atol=1e-7)
    spectra = {
        s: layer_spectrum(
            model,
            loss_fn,
            batch,
            top_k=1,
            steps=12,
            slq_probes=0,
            strategy=s,
            generator=torch.Generator().manual_seed(3),
        )
        for s in ("autograd", FD)
    }
    for layer, spectrum in spectra["autograd"].items():
        top = spectra[FD][layer].top[0]
        assert top == pytest.approx(spectrum.top[0], rel=1e-2, abs=1e-6), layer  # O(ε) error per product


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh with a first derivative only (as many fused CUDA kernels): double backward drops its curvature."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _FirstOrderMLP(nn.Module):
    def __init__(self, reentrant: bool = False):
        super().__init__()
        torch.manual_seed(8)
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.reentrant = reentrant

    def block(self, h):
        return torch.tanh(self.b(h))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.reentrant:
            h = checkpoint(self.block, h, use_reentrant=True)
        else:
            h = _OnceDifferentiableTanh.apply(self.b(h))
        return self.c(h)


def _plain_twin(model: _FirstOrderMLP) -> nn.Module:
    twin = _FirstOrderMLP(reentrant=True)
    twin.load_state_dict(model.state_dict())
    twin.forward = lambda x: twin.c(twin.block(torch.tanh(twin.a(x))))  # the same function, no checkpoint
    return twin


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant-checkpoint", "once-differentiable"])
def test_auto_falls_back_to_finite_differences_where_double_backward_cannot_go(reentrant):
    model = _FirstOrderMLP(reentrant)
    batch = (torch.randn(10, 6), torch.randint(0, 3, (10,)))
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(DoubleBackwardError, match="finite-difference") as info:  # once: silently 0 before
        estimate_curvature(model, loss_fn, batch, probes=2, strategy="autograd")
    assert ("use_reentrant=False" in str(info.value)) == reentrant
    with pytest.warns(FiniteDifferenceWarning, match="strategy 'auto' uses finite differences"):
        auto = estimate_curvature(
            model, loss_fn, batch, probes=16, strategy="auto", generator=torch.Generator().manual_seed(4)
        )
    exact = estimate_curvature(
        _plain_twin(model), loss_fn, batch, probes=16, strategy="autograd", generator=torch.Generator().manual_seed(4)
    )
    assert auto.strategy == FD
    for layer in exact.layers:
        assert abs(auto.trace[layer] - exact.trace[layer]) < 0.05 * exact.trace_se[layer], layer
        assert abs(auto.gn_trace[layer] - exact.gn_trace[layer]) < 0.05 * exact.gn_trace_se[layer], layer


def test_the_wrapper_resolves_auto_once_and_an_explicit_exact_strategy_raises_at_the_first_curvature_step():
    batch = (torch.randn(10, 6), torch.randint(0, 3, (10,)))
    loss_fn = nn.CrossEntropyLoss()
    model = _FirstOrderMLP(reentrant=True)
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), model, loss_fn, every=1, probes=2, strategy="autograd"
    )
    loss_fn(model(batch[0]), batch[1]).backward()
    with pytest.raises(DoubleBackwardError, match="use_reentrant=False"):
        opt.step(batch=batch)
    opt = CurvatureAwareOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model, loss_fn, every=1, probes=2)
    with pytest.warns(FiniteDifferenceWarning) as record:
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model(batch[0]), batch[1]).backward()
            opt.step(batch=batch)
    assert len(record) == 1 and opt.runner.strategy == FD  # said once; later estimates go there directly
    assert len(opt.history) == 3 and opt.skipped_estimates == 0


def test_the_wrapper_on_finite_differences_leaves_the_trajectory_alone():
    runs = []
    for wrap in (False, True):
        model, loss_fn, _ = _smooth("gelu_mlp")
        base = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt = CurvatureAwareOptimizer(base, model, loss_fn, every=2, probes=3, strategy=FD) if wrap else base
        g = torch.Generator().manual_seed(9)
        for _ in range(6):
            x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step(batch=(x, y)) if wrap else opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
        if wrap:
            assert len(opt.history) == 3 and opt.last_estimate.strategy == FD
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_fsdp1_is_refused_naming_fsdp2():
    class FullyShardedDataParallel(nn.Module):  # what FSDP1's wrapper looks like from outside
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(3, 2)

    with pytest.raises(TypeError, match="fully_shard"):
        curvopt.unwrap_model(FullyShardedDataParallel())


class _LayerScaleBlock(nn.Module):
    """A residual block with ConvNeXt's layer scale γ = 1e-6: the step moves γ by hundreds of times its size, so a
    Jacobian taken at θ+εz (∝ γ for the branch) would be far from the one at θ."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(10)
        self.stem, self.branch, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.gamma = nn.Parameter(torch.full((8,), 1e-6))

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        return self.head(h + self.gamma * torch.tanh(self.branch(h)))


def _same_probes(model, loss_fn, batch, probes=16):
    return {
        s: estimate_curvature(
            model, loss_fn, batch, probes=probes, strategy=s, generator=torch.Generator().manual_seed(12)
        )
        for s in ("autograd", FD)
    }


def test_the_gauss_newton_part_takes_the_jacobian_at_theta_under_layer_scale():
    batch = (torch.randn(10, 6), torch.randint(0, 3, (10,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FiniteDifferenceWarning)  # smooth: nothing to say
        runs = _same_probes(_LayerScaleBlock(), nn.CrossEntropyLoss(), batch)
    exact, fd = runs["autograd"], runs[FD]
    for layer in exact.layers:
        assert abs(fd.gn_trace[layer] - exact.gn_trace[layer]) < 0.5 * exact.gn_trace_se[layer], layer
        assert abs(fd.trace[layer] - exact.trace[layer]) < 0.5 * exact.trace_se[layer], layer
        assert 0.8 <= fd.gn_gap[layer] / exact.gn_gap[layer] <= 1.25, layer


def test_an_exactly_zero_gauss_newton_part_stays_exactly_zero():
    """A zero-initialised last layer: J = 0 for every earlier layer, so G's rows vanish and the GN-Gap is inf."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    nn.init.zeros_(model[4].weight)
    batch = (torch.randn(10, 6), torch.randint(0, 3, (10,)))
    runs = _same_probes(model, nn.CrossEntropyLoss(), batch, probes=4)
    for layer in ("0", "2"):
        assert runs["autograd"].gn_trace[layer] == 0.0 and runs["autograd"].gn_gap[layer] == float("inf")
        assert runs[FD].gn_trace[layer] == 0.0 and runs[FD].gn_gap[layer] == float("inf"), layer


class _InflatedNorm(nn.Module):
    """A tanh MLP beside a large parameter that the loss barely uses: ‖θ‖ is 10⁴× the MLP's, so the default
    relative step moves the MLP's weights by far too much and truncation dominates until the step shrinks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(14)
        self.mlp = mlp()
        self.spare = nn.Parameter(torch.full((4000,), 1000.0))

    def forward(self, x):
        return self.mlp(x) + 1e-3 * torch.tanh(self.spare[:3] / 1000.0)


def test_a_step_too_large_for_the_model_shrinks_once_and_is_remembered():
    model, loss_fn = _InflatedNorm(), nn.CrossEntropyLoss()
    batch = (torch.randn(10, 6), torch.randint(0, 3, (10,)))
    exact = estimate_curvature(
        model, loss_fn, batch, probes=16, strategy="autograd", generator=torch.Generator().manual_seed(15)
    )
    with pytest.warns(FiniteDifferenceWarning, match="relative step shrank from 0.0001 to") as record:
        fd = estimate_curvature(
            model, loss_fn, batch, probes=16, strategy=FD, generator=torch.Generator().manual_seed(15)
        )
    assert len(record) == 1
    for layer in exact.layers:
        assert abs(fd.trace[layer] - exact.trace[layer]) < 0.5 * exact.trace_se[layer], layer
        assert abs(fd.gn_trace[layer] - exact.gn_trace[layer]) < 0.5 * exact.gn_trace_se[layer], layer
    settled = curvopt.engine.finite_difference.settled_step(
        model, torch.float32, sum(p.numel() for p in model.parameters())
    )
    assert settled is not None and settled < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error", FiniteDifferenceWarning)  # said once: the next estimate starts there
        again = estimate_curvature(
            model, loss_fn, batch, probes=16, strategy=FD, generator=torch.Generator().manual_seed(15)
        )
    assert again.trace == fd.trace


def test_the_self_check_runs_once_per_model():
    model, loss_fn, batch = _smooth("tanh_mlp")
    calls = {"n": 0}
    model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    passes = []
    for _ in range(2):
        calls["n"] = 0
        estimate_curvature(model, loss_fn, batch, probes=4, strategy=FD)
        passes.append(calls["n"])
    # one pass at θ and one per probe; the first call's check adds the same probe at 2ε and 4ε
    assert passes == [1 + 4 + 2, 1 + 4]
    calls["n"] = 0
    estimate_curvature(model, loss_fn, batch, probes=4, strategy=FD, fd_step=1e-4)  # an explicit step: checked
    assert calls["n"] == 1 + 4 + 2


def test_kinks_in_a_model_without_double_backward_are_not_sent_to_autograd():
    """Hardsigmoid (MobileNetV3's squeeze-excite gate) has no double backward: the advice must not name a strategy
    that cannot run."""
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(6, 16), nn.Hardsigmoid(), nn.Linear(16, 3))
    batch = (torch.randn(10, 6) * 3, torch.randint(0, 3, (10,)))
    with pytest.raises(DoubleBackwardError):
        estimate_curvature(model, nn.CrossEntropyLoss(), batch, probes=2, strategy="autograd")
    with pytest.warns(FiniteDifferenceWarning) as record:
        estimate_curvature(model, nn.CrossEntropyLoss(), batch, probes=2, strategy=FD)
    text = str(record[0].message)
    assert "'1' (Hardsigmoid)" in text and "no exact strategy can run this model" in text
    assert "strategy='autograd'" not in text and "ReLU" not in text
