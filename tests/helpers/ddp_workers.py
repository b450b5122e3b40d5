"""Worker processes of tests/test_distributed.py (importable by spawned children)."""

from __future__ import annotations

import copy
import gc
import os
import sys
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from curvopt import CurvatureAwareOptimizer, estimate_curvature

K = 4


def _mlp() -> nn.Module:
    torch.manual_seed(0)  # the same initial parameters on every rank
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _global_batch(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _local(batch, rank: int, world: int):
    x, y = batch
    n = x.shape[0] // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def scenario_train(rank: int, world: int) -> dict:
    """DDP + SGD momentum + trace LR scaling, independent probes; everything must match across ranks."""
    model = nn.parallel.DistributedDataParallel(_mlp())
    loss_fn = nn.CrossEntropyLoss()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        model,
        loss_fn,
        every=2,
        probes=K,
        lr_scaling="trace",
        seed=3,
    )
    for step in range(12):
        x, y = _local(_global_batch(seed=100 + step), rank, world)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step(batch=(x, y))
    est = opt.last_estimate
    return {
        "history": list(opt.history),
        "lr_scales": dict(opt.lr_scales),
        "params": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
        "probes": est.probes,
        "samples": {k: v.clone() for k, v in est.samples.items()},
        "batch_size": est.batch_size,
        "skipped": opt.skipped_estimates,
    }


def scenario_train_edge(rank: int, world: int, fail_on: int | None = None) -> dict:
    """DDP + AdamW + ``lr_scaling="edge"``: each rank measures on its own shard, the scales must still agree
    (``fail_on``: this rank's second measurement raises)."""
    if rank == fail_on:
        from curvopt.control import optimizer as wrapper_module

        measure, calls = wrapper_module.preconditioned_top_eigenpair, []

        def failing_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected measurement failure")
            return measure(*args, **kwargs)

        wrapper_module.preconditioned_top_eigenpair = failing_once
    model = nn.parallel.DistributedDataParallel(_mlp())
    loss_fn = nn.CrossEntropyLoss()
    opt = CurvatureAwareOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.3), model, loss_fn, every=10**9, lr_scaling="edge", seed=3
    )
    scales = []
    for step in range(12):
        x, y = _local(_global_batch(seed=100 + step), rank, world)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step(batch=(x, y))
        scales.append(opt.lr_policy.scale)
    return {
        "scales": scales,
        "measurements": opt.lr_policy.measurements,
        "params": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
    }


def scenario_shared(rank: int, world: int) -> dict:
    """Shared probes: the reduced traces equal one process probing the concatenated batch."""
    model = nn.parallel.DistributedDataParallel(_mlp())
    loss_fn = nn.CrossEntropyLoss()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        model,
        loss_fn,
        every=1,
        probes=K,
        seed=5,
        distributed_probes="shared",
        curvature_batch_size=1000,
    )
    shared_state = opt.generator.get_state()
    batch = _global_batch()
    opt.zero_grad()
    x, y = _local(batch, rank, world)
    loss_fn(model(x), y).backward()
    opt.step(batch=(x, y))
    # the single-process reference: the same probe seed, the whole batch
    g = torch.Generator()
    g.set_state(shared_state)
    base = int(torch.randint(0, 2**62, (1,), generator=g))
    reference = estimate_curvature(
        model.module, loss_fn, batch, probes=K, gn=True, generator=torch.Generator().manual_seed(base)
    )
    return {"distributed": opt.last_estimate, "reference": reference}


def scenario_rank_failure(rank: int, world: int) -> dict:
    """Rank 1 has no batch at the first curvature step: every rank skips it, nobody hangs."""
    model = nn.parallel.DistributedDataParallel(_mlp())
    loss_fn = nn.CrossEntropyLoss()
    opt = CurvatureAwareOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, loss_fn, every=2, probes=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            x, y = _local(_global_batch(seed=step), rank, world)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step(batch=None if (rank == 1 and step == 1) else (x, y))
    return {
        "skipped": opt.skipped_estimates,
        "estimates": len(opt.history),
        "warnings": [str(w.message) for w in caught if "curvopt" in str(w.message)],
    }


def _fsdp_mlp(**kwargs) -> nn.Module:
    """The same MLP, every Linear and the root sharded by FSDP2 (``fully_shard``)."""
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, **kwargs)
    return fully_shard(model, **kwargs)


def _fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def scenario_fsdp(rank: int, world: int) -> dict:
    """FSDP2: the estimate on each rank's shards and local batch, against one process on the global batch."""
    if not _fsdp_available():
        return {"skipped": "torch.distributed.fsdp.fully_shard is not available"}
    loss_fn = nn.CrossEntropyLoss()
    batch = _global_batch()
    model = _fsdp_mlp()
    x, y = _local(batch, rank, world)
    loss_fn(model(x), y).backward()  # a training gradient in .grad, which the estimate must leave alone
    grads = [p.grad.to_local().clone() for p in model.parameters()]
    params = [p.to_local().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharded = estimate_curvature(
            model, loss_fn, (x, y), probes=16, gn=True, strategy="auto", generator=torch.Generator().manual_seed(11)
        )
    untouched = all(torch.equal(p.grad.to_local(), g) for p, g in zip(model.parameters(), grads)) and all(
        torch.equal(p.to_local(), q) for p, q in zip(model.parameters(), params)
    )
    single = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        references = {}
        for strategy in ("finite-difference", "autograd"):
            references[strategy] = estimate_curvature(
                single,
                loss_fn,
                batch,
                probes=16,
                gn=True,
                strategy=strategy,
                generator=torch.Generator().manual_seed(11),
            )
    error = None
    try:
        estimate_curvature(model, loss_fn, (x, y), probes=2, strategy="autograd")
    except Exception as exc:  # the explicit exact strategy: one line naming finite differences
        error = f"{type(exc).__name__}: {exc}"
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = _fsdp_mlp(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    with warnings.catch_warnings(record=True) as low:  # bf16 passes: the self-check must say it is rounding
        warnings.simplefilter("always")
        estimate_curvature(bf16, loss_fn, (x, y), probes=2, generator=torch.Generator().manual_seed(11))
    return {
        "sharded": sharded,
        "references": references,
        "untouched": untouched,
        "explicit_error": error,
        "warnings": [str(w.message) for w in caught],
        "bf16_warnings": [str(w.message) for w in low],
    }


def scenario_fsdp_train(rank: int, world: int) -> dict:
    """FSDP2 training through the wrapper (scaling off) against the bare optimizer: the same trajectory, and
    every rank holds the same estimates and monitor state."""
    if not _fsdp_available():
        return {"skipped": "torch.distributed.fsdp.fully_shard is not available"}
    loss_fn = nn.CrossEntropyLoss()
    runs = {}
    for wrapped in (False, True):
        model = _fsdp_mlp()
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        opt = CurvatureAwareOptimizer(base, model, loss_fn, every=2, probes=K, seed=3) if wrapped else base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(8):
                x, y = _local(_global_batch(seed=100 + step), rank, world)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step(batch=(x, y)) if wrapped else opt.step()
        runs[wrapped] = {
            "params": [p.to_local().detach().clone() for p in model.parameters()],
            "history": list(opt.history) if wrapped else None,
            "skipped": opt.skipped_estimates if wrapped else None,
            "strategy": opt.last_estimate.strategy if wrapped else None,
        }
    strict_error = None
    model = _fsdp_mlp()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), model, loss_fn, every=1, strategy="autograd"
    )
    x, y = _local(_global_batch(), rank, world)
    loss_fn(model(x), y).backward()
    try:
        opt.step(batch=(x, y))
    except Exception as exc:
        strict_error = f"{type(exc).__name__}: {exc}"
    return {"bare": runs[False], "wrapped": runs[True], "strict_error": strict_error}


def scenario_syncbn(rank: int, world: int) -> dict:
    """SyncBatchNorm on CPU under a process group: its forward refuses CPU tensors, but probing
    swaps it for a local BatchNorm (per-rank statistics), so the estimate runs and equals the
    estimate of the same model with plain BatchNorm; the module class is restored afterwards."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    x, y = _local(_global_batch(), rank, world)
    a = estimate_curvature(plain, nn.CrossEntropyLoss(), (x, y), probes=3, generator=torch.Generator().manual_seed(1))
    b = estimate_curvature(synced, nn.CrossEntropyLoss(), (x, y), probes=3, generator=torch.Generator().manual_seed(1))
    return {"plain": a.samples["trace"], "synced": b.samples["trace"], "cls": type(synced[1]).__name__}


def scenario_train_helpers(rank: int, world: int) -> dict:
    """`curvopt train`'s collective pieces: the NaN-skip vote and the sharded validation."""
    from curvopt.programs.train.loop import evaluate, finite_on_every_rank, rank_shard

    nan_on_rank1 = torch.tensor(float("nan") if rank == 1 else 1.0)
    votes = {
        "nan_on_one_rank": finite_on_every_rank(nan_on_rank1, True),
        "all_finite": finite_on_every_rank(torch.tensor(2.0), True),
    }
    model = _mlp().eval()
    g = torch.Generator().manual_seed(7)
    val = torch.utils.data.TensorDataset(torch.randn(37, 6, generator=g), torch.randint(0, 4, (37,), generator=g))
    sharded = torch.utils.data.DataLoader(rank_shard(val, rank, world), batch_size=5)
    whole = torch.utils.data.DataLoader(val, batch_size=5)
    cpu = torch.device("cpu")
    return {
        **votes,
        "shard_size": len(rank_shard(val, rank, world)),
        "sharded": evaluate(model, sharded, cpu, nullcontext, distributed=True),
        "whole": evaluate(model, whole, cpu, nullcontext),
    }


SCENARIOS = {
    "syncbn": scenario_syncbn,
    "fsdp": scenario_fsdp,
    "fsdp_train": scenario_fsdp_train,
    "train": scenario_train,
    "train_edge": scenario_train_edge,
    "train_edge_failure": lambda rank, world: scenario_train_edge(rank, world, fail_on=1),
    "shared": scenario_shared,
    "rank_failure": scenario_rank_failure,
    "train_helpers": scenario_train_helpers,
}


def run(rank: int, world: int, init_file: str, out_dir: str, scenario: str) -> None:
    """Run one scenario on this rank, save its result, then leave without interpreter teardown.

    Gloo's worker threads can abort the process (``terminate called without an active exception``)
    when the interpreter finalises while a process group or a DDP reducer that holds one is still
    alive, or when a peer tears down first. So the ranks meet at a barrier once their results are
    saved, destroy the group, collect what referenced it, and exit with ``os._exit``; the exit code
    says whether the scenario succeeded. ``rank{r}.done`` marks a clean teardown, so a crash can be
    told apart from a failure of the scenario itself.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = Path(out_dir)
    code = 0
    try:
        result = SCENARIOS[scenario](rank, world)
        torch.save(result, out / f"rank{rank}.pt")
        del result
        dist.barrier()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    finally:
        dist.destroy_process_group()
        gc.collect()
        if code == 0:
            (out / f"rank{rank}.done").touch()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
