"""A user's mistakes, tried through the real CLI: none may hang a run, lose a run or mix two runs."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

from tests.conftest import tiny_overrides
from trivit.engine.metrics import read_metrics
from trivit.engine.state.checkpoint import CheckpointManager


def trivit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trivit", *args], capture_output=True, text=True, timeout=timeout)


def train(shards, run_dir, **overrides: str) -> subprocess.CompletedProcess:
    return trivit("train", *tiny_overrides(shards, run_dir, **overrides))


def steps_saved(run_dir) -> list[int]:
    return [step for step, _ in CheckpointManager(run_dir / "checkpoints", 1).saved()]


def test_resuming_an_earlier_checkpoint_of_the_same_run_dir_is_refused(tiny_shards, tmp_path):
    assert train(tiny_shards, tmp_path, **{"schedule.max_steps": "10", "checkpoint.every_steps": "5"}).returncode == 0
    branch = train(tiny_shards, tmp_path, resume=str(tmp_path / "checkpoints" / "step_00000005"),
                   **{"schedule.max_steps": "8", "checkpoint.keep": "1"})
    assert branch.returncode == 2
    assert "is at step 5, but" in branch.stderr and "already holds later checkpoints (step_00000010)" in branch.stderr
    assert "Branch into a new run_dir (run_dir=NEW resume=" in branch.stderr
    assert steps_saved(tmp_path) == [5, 10], "nothing deleted"
    other = tmp_path.parent / (tmp_path.name + "_branch")
    branched = train(tiny_shards, other, resume=str(tmp_path / "checkpoints" / "step_00000005"),
                     **{"schedule.max_steps": "8", "checkpoint.keep": "1"})
    assert branched.returncode == 0, branched.stderr[-2000:]
    assert steps_saved(other) == [8] and steps_saved(tmp_path) == [5, 10]


def test_a_second_run_on_the_same_run_dir_stops_with_a_clear_message(tiny_shards, tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "trivit", "train",
                              *tiny_overrides(tiny_shards, tmp_path, **{"schedule.epochs": "500"})],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "metrics.jsonl").is_file():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = train(tiny_shards, tmp_path, **{"schedule.max_steps": "4"})
        assert second.returncode == 2
        assert f"is in use by another process (pid {first.pid}" in second.stderr
        assert "Wait for it to finish, or give this run another run_dir" in second.stderr
        assert first.poll() is None, "the first run goes on"
        dry = trivit("train", "--dry-run", *tiny_overrides(tiny_shards, tmp_path))
        assert dry.returncode == 2 and "is in use by another process" in dry.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = train(tiny_shards, tmp_path, **{"schedule.epochs": "500", "schedule.max_steps": "8"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]  # the killed run's lock died with it


def test_no_validation_data_trains_without_evaluation_and_says_so(tiny_shards, tmp_path):
    dry = trivit("train", "--dry-run", *tiny_overrides(tiny_shards, tmp_path, **{"data.val_urls": ""}))
    assert dry.returncode == 0 and "no validation data: training runs without evaluation" in dry.stdout
    run = train(tiny_shards, tmp_path, **{"data.val_urls": "", "schedule.max_steps": "6"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "no validation shards (data.val_urls is empty): this run trains without evaluation" in run.stderr
    assert steps_saved(tmp_path) == [4, 6] and (tmp_path / "model.safetensors").is_file()
    assert not any("eval_top1" in r for r in read_metrics(tmp_path))


def test_a_garbage_latest_checkpoint_falls_back_and_export_names_it(tiny_shards, tmp_path):
    assert train(tiny_shards, tmp_path, **{"schedule.max_steps": "8"}).returncode == 0
    latest = tmp_path / "checkpoints" / "step_00000008"
    (latest / "trainer.pt").write_bytes(random.Random(0).randbytes(4096))  # fixed garbage: the same error each run
    exported = trivit("export", str(latest))
    assert exported.returncode == 2
    assert f"checkpoint {latest} is unreadable (UnpicklingError" in exported.stderr
    resumed = train(tiny_shards, tmp_path, **{"schedule.max_steps": "10"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step_00000008 is unreadable" in resumed.stderr and "resumed from" in resumed.stderr
    assert "at step 4" in resumed.stderr
