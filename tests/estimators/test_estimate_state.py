"""Strategies agree; nothing of the model or the caller is modified; real architectures work."""

from __future__ import annotations

import gc
import weakref

import pytest
import timm
import timm.loss
import torch
from helpers import bn_cnn
from torch import nn

from curvopt import STRATEGIES, estimate_curvature
from curvopt.engine.output_hessian import OutputHessian
from curvopt.engine.products import EXACT_STRATEGIES


def _samples(model, loss_fn, batch, strategy, seed=0, probes=5, **kw):
    est = estimate_curvature(
        model, loss_fn, batch, probes=probes, strategy=strategy, generator=torch.Generator().manual_seed(seed), **kw
    )
    return est


def _assert_same_samples(a, b, rtol=1e-4, atol=1e-6):
    assert a.samples.keys() == b.samples.keys()
    for kind in a.samples:
        torch.testing.assert_close(a.samples[kind], b.samples[kind], rtol=rtol, atol=atol, msg=kind)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_all_strategies_agree_on_same_probes(dropout):
    torch.manual_seed(0)
    model = bn_cnn(dropout)
    batch = (torch.randn(8, 2, 5, 5), torch.randint(0, 4, (8,)))
    results = [_samples(model, nn.CrossEntropyLoss(), batch, s) for s in EXACT_STRATEGIES]
    for other in results[1:]:
        _assert_same_samples(results[0], other)


def test_dropout_mask_is_shared_by_all_probes():
    """With a fixed mask the estimate is exact for a quadratic in the masked net: probes must see one mask.

    Checked by equality of the loop strategy (one forward per probe, rewound RNG) and the
    autograd strategy (a single forward for all probes).
    """
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3))
    batch = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    a = _samples(model, nn.CrossEntropyLoss(), batch, "autograd", probes=6)
    b = _samples(model, nn.CrossEntropyLoss(), batch, "func", probes=6)
    _assert_same_samples(a, b)


def test_closed_form_output_hessians_match_autodiff():
    """Every closed form equals reverse-over-reverse differentiation at the outputs (the generic path)."""
    torch.manual_seed(2)
    out = torch.randn(7, 5, dtype=torch.float64)
    v = torch.randn(3, 7, 5, dtype=torch.float64)
    hard = torch.tensor([0, 1, -100, 2, 3, 4, 0])
    soft = torch.softmax(torch.randn(7, 5, dtype=torch.float64), -1)
    unnormalised = torch.rand(7, 5, dtype=torch.float64) * 2  # multi-label targets: rows do not sum to 1
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    cases = {
        "ce": (nn.CrossEntropyLoss(), hard.clamp_min(0), "cross-entropy"),
        "ce sum": (nn.CrossEntropyLoss(reduction="sum"), hard.clamp_min(0), "cross-entropy"),
        "ce smoothed": (nn.CrossEntropyLoss(label_smoothing=0.1), hard.clamp_min(0), "cross-entropy"),
        "ce weighted+ignore+smoothed": (nn.CrossEntropyLoss(weight=weight, label_smoothing=0.2), hard, "cross-entropy"),
        "ce soft": (nn.CrossEntropyLoss(), soft, "cross-entropy"),
        "ce soft unnormalised weighted": (
            nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1),
            unnormalised,
            "cross-entropy",
        ),
        "timm soft": (timm.loss.SoftTargetCrossEntropy(), unnormalised, "cross-entropy"),
        "timm smoothing": (timm.loss.LabelSmoothingCrossEntropy(0.1), hard.clamp_min(0), "cross-entropy"),
        "functional ce": (nn.functional.cross_entropy, hard, "cross-entropy"),
        "mse": (nn.MSELoss(), torch.randn(7, 5, dtype=torch.float64), "mse"),
        "mse sum": (nn.MSELoss(reduction="sum"), torch.randn(7, 5, dtype=torch.float64), "mse"),
        "bce logits": (nn.BCEWithLogitsLoss(weight=weight, pos_weight=weight.flip(0)), soft, "bce-with-logits"),
        "nll": (nn.NLLLoss(), hard.clamp_min(0), "zero"),
        "huber": (nn.HuberLoss(delta=0.5), torch.randn(7, 5, dtype=torch.float64), "generic"),
    }
    for name, (loss_fn, targets, kind) in cases.items():
        closed = OutputHessian(loss_fn, out, targets)
        generic = OutputHessian(loss_fn, out, targets, closed_form=False)
        assert closed.kind == kind and generic.kind == "generic", name
        expected = torch.stack([generic(vi) for vi in v])
        got = torch.stack([closed(vi) for vi in v])
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10, msg=name)  # torch smooths in fp32


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_model_and_caller_state_untouched():
    torch.manual_seed(3)
    model = bn_cnn(dropout=0.2)
    model[1].momentum = 0.5
    batch = (torch.randn(8, 2, 5, 5), torch.randint(0, 4, (8,)))
    nn.CrossEntropyLoss()(model(batch[0]), batch[1]).backward()  # real grads present
    grads = [p.grad.clone() for p in model.parameters()]
    model[5].eval()  # a module the user froze in eval mode
    modes = [m.training for m in model.modules()]
    state = _snapshot(model)
    rng = torch.get_rng_state()
    flags = [p.requires_grad for p in model.parameters()]
    for strategy in STRATEGIES:
        estimate_curvature(model, nn.CrossEntropyLoss(), batch, probes=3, strategy=strategy)
        after = _snapshot(model)
        for k in state:
            assert torch.equal(state[k], after[k]), f"{strategy}: {k} changed"
        assert [m.training for m in model.modules()] == modes
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        assert torch.equal(rng, torch.get_rng_state()), f"{strategy} touched the caller's RNG"
        assert [p.requires_grad for p in model.parameters()] == flags
        assert model[1].track_running_stats


def test_eval_model_is_probed_in_train_mode_and_restored(cnn_problem):
    model, loss_fn, batch = cnn_problem
    gen_seed = 4
    train_est = _samples(model.train(), loss_fn, batch, "autograd", seed=gen_seed)
    model.eval()
    eval_est = _samples(model, loss_fn, batch, "autograd", seed=gen_seed)
    assert not model.training and not any(m.training for m in model.modules())
    _assert_same_samples(train_est, eval_est, rtol=0, atol=0)


def test_no_autograd_graph_survives_the_call(cnn_problem):
    model, loss_fn, batch = cnn_problem
    refs = []
    handle = model.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    for strategy in STRATEGIES:
        estimate_curvature(model, loss_fn, batch, probes=2, strategy=strategy)
    handle.remove()
    gc.collect()
    assert refs and all(r() is None for r in refs), "an output tensor (and its graph) outlived the estimate"


def test_reproducible_with_generator(cnn_problem):
    model, loss_fn, batch = cnn_problem
    a = _samples(model, loss_fn, batch, "autograd", seed=9)
    b = _samples(model, loss_fn, batch, "autograd", seed=9)
    c = _samples(model, loss_fn, batch, "autograd", seed=10)
    _assert_same_samples(a, b, rtol=0, atol=0)
    assert not torch.equal(a.samples["trace"], c.samples["trace"])


def test_autocast_does_not_change_the_estimate(cnn_problem):
    model, loss_fn, batch = cnn_problem
    plain = _samples(model, loss_fn, batch, "autograd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = _samples(model, loss_fn, batch, "autograd")
    _assert_same_samples(plain, under, rtol=0, atol=0)


def test_timm_resnet18_estimate():
    torch.manual_seed(5)
    model = timm.create_model("resnet18", num_classes=10, pretrained=False)
    state = _snapshot(model)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    est = estimate_curvature(model, nn.CrossEntropyLoss(), batch, probes=2, generator=torch.Generator().manual_seed(0))
    assert "layer1.0.conv1" in est.layers and "fc" in est.layers and "bn1" in est.layers
    assert sum(est.numel.values()) == sum(p.numel() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(list(est.trace.values()))))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_small_vit_attention_layernorm_gelu():
    torch.manual_seed(6)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=10,
        drop_path_rate=0.1,
    )
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    a = _samples(model, nn.CrossEntropyLoss(), batch, "autograd", probes=2)
    b = _samples(model, nn.CrossEntropyLoss(), batch, "func", probes=2)
    _assert_same_samples(a, b, rtol=1e-3, atol=1e-5)
    assert "(root)" in a.layers  # cls_token / pos_embed live on the root module
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused


def test_vgg_style_network():
    torch.manual_seed(7)
    cfg = [8, "M", 16, "M", 32, 32, "M"]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    batch = (torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,)))
    a = _samples(model, nn.CrossEntropyLoss(), batch, "autograd", probes=3)
    b = _samples(model, nn.CrossEntropyLoss(), batch, "func-vmap", probes=3)
    _assert_same_samples(a, b, rtol=1e-3, atol=1e-5)


def test_compiled_and_ddp_wrappers_probe_the_inner_module(cnn_problem, tmp_path):
    import torch.distributed as dist

    model, loss_fn, batch = cnn_problem
    bare = _samples(model, loss_fn, batch, "autograd")
    compiled = torch.compile(model)  # never run: the estimate probes ._orig_mod eagerly
    _assert_same_samples(bare, _samples(compiled, loss_fn, batch, "autograd"), rtol=0, atol=0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        est = _samples(ddp, loss_fn, batch, "autograd")
        assert est.layers == bare.layers
        _assert_same_samples(bare, est, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
