"""CUDA: estimates equal the CPU's on the same probes, nothing of the caller's state moves, the wrapper
stays transparent under GradScaler (fp16) and bf16 autocast, TF32/bf16 products stay within half a
standard error of fp32 and restore the backend flags, probes live on the device and resume,
an estimate synchronises the host only at its end, and one-process NCCL DDP works.
Skipped where there is no CUDA device (benchmarks/RESULTS.md says where they ran)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import bn_cnn
from torch import nn

from curvopt import STRATEGIES, CurvatureAwareOptimizer, estimate_curvature
from curvopt.engine.products import EXACT_STRATEGIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def _problem(dtype=torch.float64, device="cuda"):
    torch.manual_seed(0)
    model = bn_cnn().to(device=device, dtype=dtype)
    x = torch.randn(8, 2, 5, 5, dtype=dtype, device=device)
    y = torch.randint(0, 4, (8,), device=device)
    return model, nn.CrossEntropyLoss(), (x, y)


@pytest.mark.parametrize("strategy", EXACT_STRATEGIES)
def test_cuda_estimates_equal_the_cpu_s_on_the_same_probes(strategy):
    cpu_model, loss_fn, (x, y) = _problem(device="cpu")
    gpu_model = copy.deepcopy(cpu_model).cuda()
    probes = dict(probes=6, strategy=strategy)
    # a CPU generator on both sides: the very same probes, copied to the device for the GPU estimate
    cpu = estimate_curvature(cpu_model, loss_fn, (x, y), generator=torch.Generator().manual_seed(1), **probes)
    gpu = estimate_curvature(
        gpu_model, loss_fn, (x.cuda(), y.cuda()), generator=torch.Generator().manual_seed(1), **probes
    )
    for kind in cpu.samples:
        torch.testing.assert_close(gpu.samples[kind], cpu.samples[kind], rtol=1e-8, atol=1e-10)


def test_probes_are_drawn_on_the_device_and_reproducible():
    model, loss_fn, batch = _problem(torch.float32)
    a = estimate_curvature(model, loss_fn, batch, probes=4, generator=torch.Generator("cuda").manual_seed(3))
    b = estimate_curvature(model, loss_fn, batch, probes=4, generator=torch.Generator("cuda").manual_seed(3))
    assert torch.equal(a.samples["trace"], b.samples["trace"])
    opt = CurvatureAwareOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model, loss_fn, every=1, probes=2)
    assert opt.generator.device.type == "cuda"


def test_state_is_untouched_on_cuda():
    torch.manual_seed(1)
    model = bn_cnn(dropout=0.3).cuda()
    x, y = torch.randn(8, 2, 5, 5, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    nn.CrossEntropyLoss()(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    for strategy in STRATEGIES:
        estimate_curvature(model, nn.CrossEntropyLoss(), (x, y), probes=3, strategy=strategy)
    assert torch.equal(cpu_rng, torch.get_rng_state()) and torch.equal(cuda_rng, torch.cuda.get_rng_state())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_wrapper_is_transparent_under_autocast_and_grad_scaler(dtype):
    results = []
    for wrap in (False, True):
        torch.manual_seed(2)
        model = bn_cnn().cuda()
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        opt = CurvatureAwareOptimizer(inner, model, nn.CrossEntropyLoss(), every=2, probes=2) if wrap else inner
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        for step in range(8):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 2, 5, 5, generator=g).cuda(), torch.randint(0, 4, (16,), generator=g).cuda()
            opt.zero_grad()
            with torch.autocast("cuda", dtype=dtype):
                loss = nn.CrossEntropyLoss()(model(x), y)
            scaler.scale(loss).backward()
            if wrap:
                opt.observe(x, y)
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
        if wrap:
            assert len(opt.history) == 4
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("precision", ["tf32", "bfloat16"])
def test_cheaper_products_stay_within_half_a_standard_error_and_restore_the_flags(precision):
    torch.manual_seed(4)
    model = bn_cnn().cuda()
    batch = (torch.randn(64, 2, 5, 5, device="cuda"), torch.randint(0, 4, (64,), device="cuda"))
    flags = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    exact = estimate_curvature(
        model,
        nn.CrossEntropyLoss(),
        batch,
        probes=16,
        curvature_dtype="float32",
        generator=torch.Generator("cuda").manual_seed(1),
    )
    cheap = estimate_curvature(
        model,
        nn.CrossEntropyLoss(),
        batch,
        probes=16,
        curvature_dtype=precision,
        generator=torch.Generator("cuda").manual_seed(1),
    )
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == flags
    for layer in exact.layers:
        assert abs(cheap.trace[layer] - exact.trace[layer]) <= 0.5 * exact.trace_se[layer], layer
        assert abs(cheap.gn_trace[layer] - exact.gn_trace[layer]) <= 0.5 * exact.gn_trace_se[layer], layer


def test_resume_restores_the_device_probe_stream():
    model, loss_fn, _ = _problem(torch.float32)

    def run(opt, steps):
        for step in steps:
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 2, 5, 5, generator=g).cuda(), torch.randint(0, 4, (8,), generator=g).cuda()
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step(batch=(x, y))

    opt = CurvatureAwareOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, loss_fn, every=1, probes=2)
    run(opt, range(3))
    state = copy.deepcopy(opt.state_dict())
    run(opt, range(3, 6))
    again = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, loss_fn, every=1, probes=2, seed=99
    )
    again.load_state_dict(state)
    run(again, range(3, 6))
    assert list(again.history)[-3:] == list(opt.history)[-3:]


def test_an_estimate_synchronises_the_host_only_at_its_end():
    model, loss_fn, batch = _problem(torch.float32)
    generator = torch.Generator("cuda").manual_seed(0)
    estimate_curvature(model, loss_fn, batch, probes=2, generator=generator)  # warm-up (kernels, caches)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            estimate_curvature(model, loss_fn, batch, probes=8, generator=generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 3, [str(w.message) for w in syncs]  # the samples' and the loss's transfer at the end


def test_one_process_nccl_ddp(tmp_path):
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model, loss_fn, (x, y) = _problem(torch.float32)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
        opt = CurvatureAwareOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.01), ddp, loss_fn, every=1, probes=2)
        for _ in range(3):
            opt.zero_grad()
            loss_fn(ddp(x), y).backward()
            opt.step(batch=(x, y))
        assert len(opt.history) == 3 and opt.skipped_estimates == 0
    finally:
        dist.destroy_process_group()
