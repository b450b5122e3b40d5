"""The examples run as they are (CI runs them), and the README shows them as they are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
NEEDS = {"huggingface_trainer.py": "transformers", "lightning_callback.py": "lightning"}


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_each_example_runs_and_reports_its_curvature(example, tmp_path):
    pytest.importorskip(NEEDS.get(example.name, "torch"))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(example), str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model (all)" in done.stdout and "alarms: []" in done.stdout
    assert (tmp_path / "out" / "curvature.jsonl").stat().st_size > 0


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_the_readme_shows_each_example_as_it_is(example):
    code = example.read_text().split('"""', 2)[2].strip()  # without the module docstring
    assert code in (ROOT / "README.md").read_text(), f"README's {example.name} snippet differs from the file"
