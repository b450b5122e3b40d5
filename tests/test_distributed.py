"""DDP on CPU: 2 gloo processes spawned by the test, bounded in time."""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import ddp_workers

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD = 2
TIMEOUT_S = 180


def _spawn(tmp_path: Path, scenario: str) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    init_file = tmp_path / "pg_init"
    args = (WORLD, str(init_file), str(tmp_path), scenario)
    procs = [ctx.Process(target=ddp_workers.run, args=(r, *args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"rank(s) {hung} still running after {TIMEOUT_S} s (a collective hang?)"
    for r, p in enumerate(procs):
        error = tmp_path / f"rank{r}.err"
        if error.exists():
            detail = error.read_text()
        elif (tmp_path / f"rank{r}.pt").exists() and not (tmp_path / f"rank{r}.done").exists():
            detail = "its result was saved; it died while tearing down the process group"
        else:
            detail = "no result and no traceback: it died inside the scenario"
        assert p.exitcode == 0, f"rank {r} exited with {p.exitcode}: {detail}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_agree_bit_for_bit_with_lr_scaling(tmp_path):
    r0, r1 = _spawn(tmp_path, "train")
    assert r0["skipped"] == r1["skipped"] == 0
    assert len(r0["history"]) == 6
    assert r0["history"] == r1["history"]  # estimates, CUSUM statistics, scales: identical floats
    assert r0["lr_scales"] == r1["lr_scales"]
    assert any(s != 1.0 for s in r0["lr_scales"].values())  # the scaling really acted
    for name, tensor in r0["params"].items():
        assert torch.equal(tensor, r1["params"][name]), name
    # independent probes: each rank adds its own K, and the ranks' probes differ
    assert r0["probes"] == WORLD * ddp_workers.K
    assert r0["batch_size"] == 32
    per_rank = r0["samples"]["trace"].reshape(WORLD, ddp_workers.K, -1)
    assert not torch.equal(per_rank[0], per_rank[1])


@pytest.mark.parametrize("scenario", ["train_edge", "train_edge_failure"])
def test_edge_scales_agree_across_ranks(tmp_path, scenario):
    """Also when one rank's measurement fails: no hang in the collectives, and every rank skips that measurement."""
    r0, r1 = _spawn(tmp_path, scenario)
    assert r0["measurements"] == r1["measurements"] > 0
    assert min(r0["scales"]) < 1.0  # the policy acted (Adam's first steps are far past its edge at this LR)
    assert r0["scales"] == r1["scales"]
    for name, tensor in r0["params"].items():
        assert torch.equal(tensor, r1["params"][name]), name


def test_shared_probes_equal_the_single_process_estimate_on_the_concatenated_batch(tmp_path):
    r0, r1 = _spawn(tmp_path, "shared")
    est, ref = r0["distributed"], r0["reference"]
    assert est.probes == ref.probes == ddp_workers.K
    assert est.batch_size == ref.batch_size == 32
    for kind in ("trace", "gn_trace"):
        torch.testing.assert_close(est.samples[kind], ref.samples[kind], rtol=1e-5, atol=1e-7)
    for name in est.layers:
        assert math.isclose(est.trace[name], ref.trace[name], rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(est.loss, ref.loss, rel_tol=1e-6)
    assert torch.equal(r1["distributed"].samples["trace"], est.samples["trace"])


def test_a_rank_without_a_batch_skips_on_every_rank_without_hanging(tmp_path):
    r0, r1 = _spawn(tmp_path, "rank_failure")
    assert r0["skipped"] == r1["skipped"] == 1
    assert r0["estimates"] == r1["estimates"] == 1
    assert any("rank(s) [1] could not estimate" in w for w in r0["warnings"])
    assert r1["warnings"] == []  # only rank 0 warns


def test_train_loop_skips_a_nan_batch_on_every_rank_and_validates_on_disjoint_shards(tmp_path):
    r0, r1 = _spawn(tmp_path, "train_helpers")
    for r in (r0, r1):
        assert r["nan_on_one_rank"] is False  # rank 1's NaN makes both ranks skip: no backward hangs
        assert r["all_finite"] is True
        assert r["sharded"]["loss"] == pytest.approx(r["whole"]["loss"], rel=1e-6)  # float32 batch sums
        assert r["sharded"]["top1"] == r["whole"]["top1"]
    assert r0["shard_size"] + r1["shard_size"] == 37  # 19 + 18: no sample padded in twice


@pytest.mark.slow
def test_torchrun_curvopt_train_writes_one_set_of_logs(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        "-m",
        "curvopt",
        "train",
        "--dataset",
        "synthetic",
        "--synthetic-samples",
        "64",
        "-b",
        "8",
        "--model",
        "resnet18",
        "--epochs",
        "2",
        "--curv-every",
        "1",
        "--curv-probes",
        "2",
        "--curv-batch-size",
        "4",
        "--grad-accum-steps",
        "2",
        "--log-wandb",
        "--no-progress",
        "--output",
        str(tmp_path),
        "--experiment",
        "ddp",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("curvopt train: resnet18") == 1  # rank 0 prints
    assert "x 2 ranks (DDP)" in done.stdout
    run_dir = tmp_path / "ddp"
    from curvopt import read_jsonl

    records = read_jsonl(run_dir / "curvature.jsonl")
    metrics = [r for r in records if r["type"] == "metrics"]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]  # 4 batches/epoch per rank, 2 per update; written once
    assert sum(r["type"] == "config" for r in records) == 1
    assert records[0]["curvopt"]["world_size"] == WORLD
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    ckpt = torch.load(run_dir / "last.pth.tar", map_location="cpu", weights_only=False)
    assert ckpt["num_updates"] == 4
    assert metrics[-1]["curv/probes"] == WORLD * 2

    # resume under torchrun: every rank loads the checkpoint; steps, schedule and W&B run continue
    resume = [*cmd, "--resume", str(run_dir / "last.pth.tar")]
    resume[resume.index("--epochs") + 1] = "3"
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("resuming at epoch 3, update 4") == 1
    metrics = [r for r in read_jsonl(run_dir / "curvature.jsonl") if r["type"] == "metrics"]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    ckpt = torch.load(run_dir / "last.pth.tar", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["optimizer"]["curvopt"]["step_count"] == 6
    assert len({p.name.rsplit("-", 1)[1] for p in run_dir.glob("wandb/offline-run-*")}) == 1  # one W&B run id


def test_fsdp2_estimates_the_global_batch_curvature_on_every_rank(tmp_path):
    results = _spawn(tmp_path, "fsdp")
    if "skipped" in results[0]:
        pytest.skip(results[0]["skipped"])
    r0, r1 = results
    for kind in r0["sharded"].samples:  # one all-reduce: the same estimate on both ranks
        assert torch.equal(r0["sharded"].samples[kind], r1["sharded"].samples[kind]), kind
    sharded, fd, exact = r0["sharded"], r0["references"]["finite-difference"], r0["references"]["autograd"]
    assert sharded.strategy == "finite-difference" and sharded.batch_size == 32
    assert any("FSDP" in w and "finite differences" in w for w in r0["warnings"])
    assert not any("disagree" in w for w in r0["warnings"])  # a smooth model passes the self-check
    # the probes a single process draws, on the global batch: the same numbers up to rounding / ε
    for kind in fd.samples:
        # per sample, the rounding of two reduction orders over ε (ρ = 1e-4): ≲ 1 % where a sample nears 0
        torch.testing.assert_close(sharded.samples[kind], fd.samples[kind], rtol=1e-2, atol=1e-5, msg=kind)
    for layer in exact.layers:  # and a small fraction of an SE from the exact products on those probes
        assert abs(sharded.trace[layer] - exact.trace[layer]) < 0.05 * exact.trace_se[layer], layer
        assert abs(sharded.gn_trace[layer] - exact.gn_trace[layer]) < 0.05 * exact.gn_trace_se[layer], layer
    assert abs(sharded.loss - exact.loss) < 1e-6
    assert any("mostly rounding" in w for w in r0["bf16_warnings"])  # MixedPrecisionPolicy(param_dtype=bf16)
    for result in results:
        assert result["untouched"], "the estimate changed a parameter shard or .grad"
        assert result["explicit_error"].startswith("DoubleBackwardError")
        assert "finite-difference" in result["explicit_error"] and "FSDP" in result["explicit_error"]


def test_fsdp2_training_through_the_wrapper_is_the_bare_optimizer_s(tmp_path):
    results = _spawn(tmp_path, "fsdp_train")
    if "skipped" in results[0]:
        pytest.skip(results[0]["skipped"])
    for result in results:
        for bare, wrapped in zip(result["bare"]["params"], result["wrapped"]["params"]):
            assert torch.equal(bare, wrapped)
        assert result["wrapped"]["skipped"] == 0 and len(result["wrapped"]["history"]) == 4
        assert result["wrapped"]["strategy"] == "finite-difference"
        assert "finite-difference" in result["strict_error"]  # an explicit exact strategy raises at once
    assert results[0]["wrapped"]["history"] == results[1]["wrapped"]["history"]


def test_sync_batchnorm_is_probed_with_per_rank_statistics(tmp_path):
    for result in _spawn(tmp_path, "syncbn"):
        assert torch.equal(result["plain"], result["synced"])
        assert result["cls"] == "SyncBatchNorm"


@pytest.mark.slow
def test_torchrun_curvopt_train_fsdp_resumes_exactly(tmp_path):
    """``--fsdp``: a ViT sharded over 2 ranks, curvature by finite differences; full-state checkpoints, so a run
    stopped after 2 epochs and resumed to 3 ends with the uninterrupted 3-epoch run's weights and estimates (a step
    schedule that does not decay within 3 epochs, so the runs' --epochs do not change the learning rates)."""
    if not ddp_workers._fsdp_available():
        pytest.skip("torch.distributed.fsdp.fully_shard is not available")
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}

    def train(experiment: str, epochs: int, *extra: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={WORLD}",
            "-m",
            "curvopt",
            "train",
            "--dataset",
            "synthetic",
            "--synthetic-samples",
            "64",
            "--img-size",
            "16",
            "-b",
            "8",
            "--model",
            "vit_tiny_patch16_224",
            "--model-kwargs",
            "{patch_size: 4, depth: 2, img_size: 16}",
            "--opt",
            "adamw",
            "--lr",
            "1e-3",
            "--sched",
            "step",
            "--epochs",
            str(epochs),
            "--curv-every",
            "1",
            "--curv-probes",
            "2",
            "--curv-batch-size",
            "4",
            "--grad-accum-steps",
            "2",
            "--fsdp",
            "--no-progress",
            "--output",
            str(tmp_path),
            "--experiment",
            experiment,
            *extra,
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    first = train("cut", 2)
    assert "x 2 ranks (FSDP2)" in first.stdout and "FSDPLinear" not in first.stdout  # layers keep their own types
    assert first.stderr.count("strategy 'auto' uses finite differences") == 1  # said once, by rank 0
    train("cut", 3, "--resume", str(tmp_path / "cut" / "last.pth.tar"))
    train("whole", 3)
    cut = torch.load(tmp_path / "cut" / "last.pth.tar", map_location="cpu", weights_only=False)
    whole = torch.load(tmp_path / "whole" / "last.pth.tar", map_location="cpu", weights_only=False)
    assert cut["num_updates"] == whole["num_updates"] == 6
    for name, tensor in whole["model"].items():  # full (unsharded) tensors in the checkpoint
        assert torch.equal(cut["model"][name], tensor), name
    assert cut["optimizer"]["curvopt"]["history"] == whole["optimizer"]["curvopt"]["history"]
    assert whole["optimizer"]["curvopt"]["history"][-1]["curv/probes"] == 2  # FSDP: shared global probes
