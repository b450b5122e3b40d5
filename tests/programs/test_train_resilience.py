"""`curvopt train` survives: kill -9 anywhere and resume bit for bit, one live run per directory,
logs without duplicates, refused or recorded setting changes, checked checkpoints, one-line errors."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import curvopt.programs.train.checkpoint as checkpoint_module
from curvopt import read_jsonl
from curvopt.programs.cli import main as cli_main
from curvopt.programs.train.rundir import RunDirLock

HERE = Path(__file__).resolve().parents[1] / "helpers"
# Every random stream the loop has: shuffling, drop-path, Mixup/CutMix, label noise; 4 updates/epoch.
RUN = [
    "train",
    "--dataset",
    "synthetic",
    "--synthetic-samples",
    "64",
    "-b",
    "16",
    "--img-size",
    "16",
    "--model",
    "test_resnet",
    "--drop-path",
    "0.1",
    "--mixup",
    "0.4",
    "--label-noise",
    "0.3",
    "--opt",
    "adamw",
    "--lr",
    "2e-3",
    "--curv-every",
    "2",
    "--curv-probes",
    "2",
    "--curv-batch-size",
    "8",
    "--cusum-warmup",
    "3",
    "--log-interval",
    "1",
    "--no-progress",
    "--workers",
    "0",
    "--log-wandb",
    "false",
]
EPOCHS = 8


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


def _launch(out: Path, kill_on_save: int, resume: bool) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(HERE / "crash_run.py"),
        str(kill_on_save),
        *RUN,
        "--epochs",
        str(EPOCHS),
        "--output",
        str(out),
        "--experiment",
        "run",
    ]
    if resume:
        cmd += ["--resume", str(out / "run" / "last.pth.tar")]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _metrics(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "run_id"}
        for r in read_jsonl(run_dir / "curvature.jsonl")
        if r["type"] in ("metrics", "eval", "alarm")
    ]


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    code, text = _finish(_launch(tmp_path / "reference", 0, resume=False))
    assert code == 0, text[-3000:]
    reference = tmp_path / "reference" / "run"

    out = tmp_path / "killed"
    rng = random.Random(0)  # kills inside checkpoint writes, then at random times (start-up takes ~5 s here)
    plan = [("save", 2), ("save", 3), ("save", 1), ("time", rng.uniform(4.0, 8.0)), ("time", rng.uniform(4.0, 8.0))]
    kills = 0
    for how, when in plan:
        run_dir = out / "run"
        resume = (run_dir / "last.pth.tar").exists()
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)  # killed before its first checkpoint: start again
        proc = _launch(out, when if how == "save" else 0, resume)
        if how == "time":
            try:
                proc.wait(timeout=when)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        code, text = _finish(proc)
        kills += code == -signal.SIGKILL
        assert code in (0, -signal.SIGKILL), text[-3000:]
        if code == 0:
            break
    else:
        code, text = _finish(_launch(out, 0, resume=(out / "run" / "last.pth.tar").exists()))
        assert code == 0, text[-3000:]
    assert kills >= 3, "the plan should have interrupted the run several times"

    got, want = (torch.load(d / "last.pth.tar", weights_only=False) for d in (out / "run", reference))
    assert got["epoch"] == want["epoch"] == EPOCHS - 1 and got["num_updates"] == want["num_updates"]
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert got["optimizer"]["curvopt"]["history"] == want["optimizer"]["curvopt"]["history"]
    records = _metrics(out / "run")
    assert records == _metrics(reference)  # curvature, eval and alarm records, bit for bit
    steps = [r["step"] for r in records if r["type"] == "metrics"]
    assert steps == sorted(set(steps)), "a step was logged twice"
    assert not list((out / "run").glob("*.tmp*")), "a partial checkpoint was left behind"


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_directory_do_not_touch_each_other(tmp_path):
    first, second = _launch(tmp_path, 0, resume=False), _launch(tmp_path, 0, resume=False)
    results = [_finish(first), _finish(second)]
    for code, text in results:
        assert code == 0, text[-3000:]
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == ["run", "run-1"]
    for name in dirs:
        records = read_jsonl(tmp_path / name / "curvature.jsonl")
        assert len({r["run_id"] for r in records}) == 1  # one run per log, every record tagged
        state = torch.load(tmp_path / name / "last.pth.tar", weights_only=False)
        assert state["epoch"] == EPOCHS - 1 and state["run_id"] == records[0]["run_id"]
    assert any("already holds a run" in text for _, text in results)


# ---------------------------------------------------------------------- in-process: each numbered problem
SMALL = [*RUN, "--epochs", "2"]


def _train(tmp_path: Path, *extra: str, name: str = "run") -> tuple[int, Path]:
    code = cli_main([*SMALL, "--output", str(tmp_path), "--experiment", name, *extra])
    return code, tmp_path / name


def test_a_fresh_run_in_an_existing_run_directory_goes_to_a_new_one(tmp_path, capsys):
    assert _train(tmp_path)[0] == 0
    before = (tmp_path / "run" / "curvature.jsonl").read_bytes()
    assert _train(tmp_path)[0] == 0
    assert "writes to" in capsys.readouterr().out and (tmp_path / "run-1" / "last.pth.tar").exists()
    assert (tmp_path / "run" / "curvature.jsonl").read_bytes() == before  # the old run's log untouched


def test_a_resume_into_a_live_run_s_directory_is_refused(tmp_path, capsys):
    code, run_dir = _train(tmp_path)
    assert code == 0
    lock = RunDirLock(run_dir)
    lock.acquire()  # a live run holds the directory
    try:
        assert cli_main([*SMALL, "--epochs", "3", "--resume", str(run_dir / "last.pth.tar")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "in use by a live run" in err and str(os.getpid()) in err
    finally:
        lock.release()
    assert cli_main([*SMALL, "--epochs", "3", "--resume", str(run_dir / "last.pth.tar")]) == 0  # free again


def test_resume_cuts_the_log_back_repairs_a_torn_line_and_keeps_the_run_id(tmp_path, capsys):
    code, run_dir = _train(tmp_path)
    assert code == 0
    log = run_dir / "curvature.jsonl"
    with open(log, "a", encoding="utf-8") as handle:  # a kill after the checkpoint: a redone step, a torn line
        handle.write('{"type": "metrics", "step": 9, "curv/loss": 1.0}\n{"type": "metrics", "st')
    run_id = read_jsonl(log)[0]["run_id"]
    assert cli_main([*SMALL, "--epochs", "3", "--resume", str(run_dir / "last.pth.tar")]) == 0
    records = read_jsonl(log)
    steps = [r["step"] for r in records if r["type"] == "metrics"]
    assert steps == [2, 4, 6, 8, 10, 12] and {r["run_id"] for r in records} == {run_id}
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [0, 1, 2]
    events = [r["kind"] for r in records if r["type"] == "event"]
    assert "resume" in events
    assert cli_main(["report", str(run_dir)]) == 0


def test_a_mismatching_resume_is_refused_before_anything_is_written(tmp_path, capsys):
    code, run_dir = _train(tmp_path)
    assert code == 0
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for flag, value in (("--model", "resnet18"), ("--opt", "sgd"), ("--lr", "0.5")):
        assert cli_main([*SMALL, flag, value, "--resume", str(run_dir / "last.pth.tar")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"trained with {flag}" in err and "cannot change on resume" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files  # nothing changed


def test_settings_changed_on_resume_are_applied_and_recorded(tmp_path, capsys):
    code, run_dir = _train(tmp_path)
    assert code == 0
    resume = [*SMALL, "--epochs", "3", "--cusum-threshold", "2", "--resume", str(run_dir / "last.pth.tar")]
    assert cli_main(resume) == 0
    assert "settings changed on resume: epochs: 2 -> 3, cusum_threshold: 10.0 -> 2" in capsys.readouterr().out
    state = torch.load(run_dir / "last.pth.tar", weights_only=False)
    assert state["optimizer"]["curvopt"]["monitor"]["settings"]["h"] == 2.0  # what runs is what was asked
    assert state["args"]["cusum_threshold"] == 2.0
    events = [r for r in read_jsonl(run_dir / "curvature.jsonl") if r["type"] == "event"]
    assert any(e["kind"] == "settings_changed" and "cusum_threshold" in e["text"] for e in events)


def test_without_gauss_newton_the_run_ends_cleanly(tmp_path, capsys):
    code, _ = _train(tmp_path, "--curv-gn", "false")
    assert code == 0, capsys.readouterr().err
    assert "gn_trace" not in capsys.readouterr().out.split("last curvature estimate")[1].splitlines()[1]


def test_a_blind_monitor_says_so(tmp_path, capsys, monkeypatch):
    import curvopt.estimators.trace as trace

    def blind(*args, **kwargs):
        raise trace.NonFiniteCurvatureError("non-finite curvature products in layer(s) fc", ["fc"])

    monkeypatch.setattr(trace, "_checked_estimate", blind)
    code, run_dir = _train(tmp_path)
    assert code == 0
    out = capsys.readouterr().out
    assert "no memorisation alarm" not in out
    assert "the monitor saw nothing, all 4 curvature estimates were skipped (since update 2" in out
    skipped = [r for r in read_jsonl(run_dir / "curvature.jsonl") if "curv/skipped_estimates" in r]
    assert [r["curv/skipped_estimates"] for r in skipped] == [1, 2, 3, 4]
    assert "non-finite" in skipped[0]["curv/skip_reason"]


def test_a_corrupted_checkpoint_is_refused(tmp_path, capsys):
    code, run_dir = _train(tmp_path)
    assert code == 0
    path = run_dir / "last.pth.tar"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = os.urandom(16)  # inside the tensor data
    path.write_bytes(bytes(data))
    assert cli_main([*SMALL, "--epochs", "3", "--resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert "corrupted (checksum mismatch" in err


def test_a_full_disk_says_so_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    code, run_dir = _train(tmp_path)
    assert code == 2
    assert "no space left on the device" in capsys.readouterr().err
    assert not list(run_dir.glob("*.tmp*"))


@pytest.mark.parametrize(
    "case, says",
    [("file", "is a file, not a directory"), ("read-only", "permission denied"), ("read-only fs", "read-only")],
)
def test_an_unusable_output_is_a_one_line_error_and_leaves_nothing(tmp_path, capsys, monkeypatch, case, says):
    if case == "file":
        output = tmp_path / "taken"
        output.write_text("not a directory")
    elif case == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only directories (the read-only fs case covers it)")
        output = tmp_path / "ro"
        output.mkdir()
        output.chmod(0o500)
    else:
        output = tmp_path / "mounted-ro"
        real_mkdir = Path.mkdir

        def read_only_fs(self, *args, **kwargs):
            if str(self).startswith(str(output)):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only_fs)
    code = cli_main([*SMALL, "--output", str(output / "sub"), "--experiment", "run"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err
    assert not list(tmp_path.rglob("args.yaml")) and not list(tmp_path.rglob("*.jsonl"))


def test_on_alarm_stop_ends_the_run_cleanly_and_names_the_best_checkpoint(tmp_path, capsys, monkeypatch):
    from curvopt.control.monitor import Alarm, CusumMonitor

    def always_alarm(self, step, estimate):  # an alarm at the 3rd estimate
        self.count += 1
        return [Alarm(step, ["fc"], 11.0, 10.0)] if self.count == 3 else []

    monkeypatch.setattr(CusumMonitor, "update", always_alarm)
    code, run_dir = _train(tmp_path, "--on-alarm", "stop", "--epochs", "4")
    assert code == 0
    out = capsys.readouterr().out
    assert "stopped at the alarm at update 6 (--on-alarm stop)" in out and "model_best.pth.tar (epoch 1" in out
    state = torch.load(run_dir / "last.pth.tar", weights_only=False)
    assert state["stopped_at_alarm"] == 6 and state["num_updates"] == 6 and state["epoch"] == 1


def test_on_alarm_checkpoint_saves_the_state_at_each_alarm(tmp_path, monkeypatch):
    from curvopt.control.monitor import Alarm, CusumMonitor

    def alarms(self, step, estimate):
        self.count += 1
        return [Alarm(step, ["fc"], 11.0, 10.0)] if self.count in (2, 4) else []

    monkeypatch.setattr(CusumMonitor, "update", alarms)
    code, run_dir = _train(tmp_path, "--on-alarm", "checkpoint")
    assert code == 0
    assert sorted(p.name for p in run_dir.glob("alarm-*.pth.tar")) == ["alarm-4.pth.tar", "alarm-8.pth.tar"]
    state = torch.load(run_dir / "alarm-4.pth.tar", weights_only=False)
    assert state["alarm"]["step"] == 4 and state["mid_epoch"]


def test_the_rollback_s_weight_average_is_in_the_checkpoint_and_resumes_exactly(tmp_path):
    rollback = ("--on-alarm", "rollback", "--rollback-average", "0.5", "--sched", "step", "--decay-epochs", "100")
    assert _train(tmp_path, *rollback, name="whole")[0] == 0
    assert cli_main([*RUN, "--epochs", "1", "--output", str(tmp_path), "--experiment", "cut", *rollback]) == 0
    resumed = ["--resume", str(tmp_path / "cut" / "last.pth.tar")]
    assert cli_main([*SMALL, "--output", str(tmp_path), "--experiment", "cut", *rollback, *resumed]) == 0
    whole, cut = (torch.load(tmp_path / n / "last.pth.tar", weights_only=False) for n in ("whole", "cut"))
    assert whole["rollback_average"]["step"] == cut["rollback_average"]["step"] == 8  # sampled at every estimate
    for name, tensor in whole["rollback_average"]["state"].items():
        assert torch.equal(cut["rollback_average"]["state"][name], tensor), name
    assert any(not torch.equal(whole["model"][k], v) for k, v in whole["rollback_average"]["state"].items())
