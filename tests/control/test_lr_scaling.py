"""Layer-wise LR scaling: the per-layer learning-rate mechanism equals the update-scaling one, the
user's groups survive, and each named policy does what its docstring says."""

from __future__ import annotations

import copy
import math

import pytest
import timm.optim
import torch
from torch import nn

from curvopt import LR_SCALING_POLICIES, CurvatureAwareOptimizer
from curvopt.control.update_scaling import lerp_scaled_step, lr_is_linear, lr_scaled_step
from curvopt.engine.layers import group_parameters
from curvopt.estimators.local import local_curvature

MAKERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "adamw_foreach_off": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
}


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


@pytest.mark.parametrize("name", list(MAKERS))
def test_per_layer_learning_rates_equal_scaled_updates(name):
    """20 steps with a changing base rate: lr·s_l through the groups == θ_old + s_l Δθ after the step."""
    models = [_mlp(), _mlp()]
    opts = [MAKERS[name](m.parameters()) for m in models]
    assert lr_is_linear(opts[0])
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5) for o in opts]
    scales = [0.25, 3.0, 0.5]
    for step in range(20):
        x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(step)), torch.randint(0, 3, (16,))
        for model, opt, mechanism in zip(models, opts, ("lr", "lerp")):
            layers = [(s, tuple(layer.params)) for s, layer in zip(scales, group_parameters(model))]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if mechanism == "lr":
                lr_scaled_step(opt, opt.step, layers)
            else:
                lerp_scaled_step(opt.step, layers)
        for sched in scheds:
            sched.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    base = 0.05 if "sgd" in name else 1e-2
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"] == pytest.approx(base / 16)  # the schedule


def test_the_user_s_groups_come_back_even_when_the_step_fails():
    model = _mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}], lr=0.2)
    groups, lrs = opt.param_groups, [g["lr"] for g in opt.param_groups]

    def failing():
        assert len(opt.param_groups) == 3 and opt.param_groups[0]["lr"] == pytest.approx(0.05)  # split for the step
        raise RuntimeError("inner step failed")

    with pytest.raises(RuntimeError, match="inner step failed"):
        lr_scaled_step(opt, failing, [(0.5, tuple(model[0].parameters())), (2.0, (model[2].weight,))])
    assert opt.param_groups is groups and [g["lr"] for g in groups] == lrs


def test_non_linear_optimizers_use_the_update_mechanism():
    model = _mlp()
    assert not lr_is_linear(timm.optim.Lamb(model.parameters()))
    assert not lr_is_linear(timm.optim.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1)))


def test_policy_names_are_public_and_accepted():
    assert LR_SCALING_POLICIES == ("trace", "local", "cap", "trust", "edge")
    for policy in LR_SCALING_POLICIES:
        model = _mlp()
        opt = CurvatureAwareOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model,
            nn.CrossEntropyLoss(),
            every=2,
            probes=2,
            lr_scaling=policy,
        )
        for step in range(6):
            x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(step)), torch.randint(0, 3, (16,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step(batch=(x, y))
        assert set(opt.lr_scales) == {"0", "2", "4"} and all(math.isfinite(s) and s > 0 for s in opt.lr_scales.values())
        assert opt.settings()["lr_scaling"] == policy
        restored = CurvatureAwareOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), lr_scaling=policy
        )
        restored.load_state_dict(copy.deepcopy(opt.state_dict()))
        assert restored.lr_scales == opt.lr_scales


def test_local_curvature_of_a_linear_layer_is_its_input_energy():
    """α = tr(JᵀJ)/d = (Σ_i ‖x_i‖² + B) / (d_in + 1) for z = W x + b over a batch of B."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(7, 5) * 3
    blocks = group_parameters(model)
    alpha = local_curvature(
        model, blocks, (x, torch.zeros(7, dtype=torch.long)), probes=4000, generator=torch.Generator().manual_seed(0)
    )
    hidden = torch.tanh(model[0](x))
    for name, inputs in (("0", x), ("2", hidden)):
        exact = (float(inputs.pow(2).sum()) + len(inputs)) / (inputs.shape[1] + 1)
        assert alpha[name] == pytest.approx(exact, rel=0.03), name


def test_local_policy_equalises_layers_fed_by_very_different_activations():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(10)  # layer 2's input is ~10x larger: its local Hessian ~100x
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01),
        model,
        nn.CrossEntropyLoss(),
        every=1,
        probes=2,
        lr_scaling="local",
    )
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step(batch=(x, y))
    assert opt.lr_scales["2"] < opt.lr_scales["0"] / 10


def test_cap_slows_only_the_layers_whose_step_exceeds_their_edge():
    torch.manual_seed(3)
    model = _mlp()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=50.0), model, nn.CrossEntropyLoss(), every=1, probes=2, lr_scaling="cap"
    )
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step(batch=(x, y))
    top = opt.lr_policy.top
    for name, scale in opt.lr_scales.items():
        assert scale == pytest.approx(min(1.0, 1.0 / (50.0 * top[name])))
    assert min(opt.lr_scales.values()) < 1.0


def test_trust_ratio_follows_weight_to_gradient_norms():
    torch.manual_seed(4)
    model = _mlp()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), model, nn.CrossEntropyLoss(), every=0, lr_scaling="trust"
    )
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    ratios = {}
    for block in opt.layer_blocks:
        weights = torch.cat([p.reshape(-1) for p in block.params]).norm()
        ratios[block.name] = float(weights / torch.cat([p.grad.reshape(-1) for p in block.params]).norm())
    opt.step()
    median = sorted(ratios.values())[1]
    for name, ratio in ratios.items():
        assert opt.lr_scales[name] == pytest.approx(min(10, max(0.1, ratio / median)), rel=1e-5)


def test_a_user_written_policy_sets_the_layers_rates():
    """The LRPolicy protocol: a small object of the user's own turns estimates into per-layer scales, checkpointed."""
    from curvopt import LRPolicy

    class SlowFirstLayer:
        def __init__(self) -> None:
            self.calls = 0

        def update(self, estimate):
            self.calls += 1
            return {estimate.layers[0]: 0.25}

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state["calls"]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    policy = SlowFirstLayer()
    assert isinstance(policy, LRPolicy)
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), every=1, probes=2, lr_scaling=policy
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step(batch=(x, y))
    assert opt.lr_scales == {"0": 0.25, "2": 1.0} and policy.calls == 1
    for p, b, g, s in zip(model.parameters(), before, grads, (0.25, 0.25, 1.0, 1.0)):
        assert torch.allclose(p.detach(), b - 0.1 * s * g)  # the first layer stepped at a quarter of the rate
    assert opt.state_dict()["curvopt"]["lr_policy"] == {"calls": 1}
    with pytest.raises(TypeError, match=r"must define update\(\) \(see curvopt\.LRPolicy\)"):
        CurvatureAwareOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), lr_scaling=object()
        )
