"""The command line, run as a user runs it: a real subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

from tests.conftest import tiny_overrides

DEMO = str(Path(__file__).parents[1] / "configs" / "demo.yaml")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trivit", *args], capture_output=True, text=True, timeout=300)


def test_train_through_the_cli_and_resume_a_finished_run(tiny_shards, tmp_path):
    overrides = tiny_overrides(tiny_shards, tmp_path / "run", **{"schedule.max_steps": "6"})
    result = run_cli("train", "--config", DEMO, *overrides)
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["step"] == 6 and "eval_top1" in last
    again = run_cli("train", "--config", DEMO, *overrides)
    assert again.returncode == 0
    assert "finished at step 6" in again.stdout


def test_bad_key_exits_2_with_the_fix(tmp_path):
    result = run_cli("train", "--config", DEMO, f"run_dir={tmp_path}", "optim.lr_rate=1")
    assert result.returncode == 2
    assert "config key 'optim.lr_rate': unknown key (did you mean 'optim.lr'?)" in result.stderr


def test_dry_run_validates_and_counts_steps(tiny_shards, tmp_path):
    result = run_cli("train", "--config", DEMO, "--dry-run",
                     *tiny_overrides(tiny_shards, tmp_path / "run", **{"schedule.epochs": "3"}))
    assert result.returncode == 0, result.stderr
    assert "256 training samples, 3 epochs of up to 16 steps of 16 images" in result.stdout
    assert not (tmp_path / "run").exists()
