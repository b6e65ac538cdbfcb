"""Faults injected for real: kill -9 and SIGTERM of a training process, non-finite losses,
corrupt checkpoints. Nothing is lost; a resumed run logs the uninterrupted run's losses."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import default_sigint, fault_step, tiny_overrides
from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.state.checkpoint import CheckpointManager
from trivit.engine.trainer import Trainer

DEMO = str(Path(__file__).parents[2] / "configs" / "demo.yaml")
RUN = {"schedule.max_steps": "24", "checkpoint.every_steps": "3", "data.batch_size": "32"}


def command(shards, run_dir) -> list[str]:
    return [sys.executable, "-m", "trivit", "train", "--config", DEMO, *tiny_overrides(shards, run_dir, **RUN)]


def wait_for_steps(run_dir: Path, steps: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert process.poll() is None, "training ended before the fault was injected"
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {steps} steps after {timeout} s")


def last_losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; steps logged again after a resume keep their last value."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(command(tiny_shards, run_dir), check=True, capture_output=True, timeout=300)
    return last_losses(run_dir)


def test_kill_9_then_resume_logs_the_uninterrupted_losses(tiny_shards, tmp_path, uninterrupted):
    kill_after = fault_step(4, 18)
    process = subprocess.Popen(command(tiny_shards, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_steps(tmp_path, kill_after, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    saved = CheckpointManager(tmp_path / "checkpoints", 2).saved()
    assert saved, "a checkpoint was written before the kill"
    subprocess.run(command(tiny_shards, tmp_path), check=True, capture_output=True, timeout=300)
    resumed = last_losses(tmp_path)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 25))
    assert resumed == uninterrupted, f"killed after step {kill_after}, resumed from step {saved[-1][0]}"


KILL_IN_CHECKPOINT = """
import os, signal, sys, torch
from trivit.cli import main
save = torch.save
def save_then_die(state, path, *args, **kwargs):
    save(state, path, *args, **kwargs)
    if str(path).endswith("step_{step:08d}.tmp/trainer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)  # the folder is written, the rename never happens
torch.save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_while_a_checkpoint_folder_is_tmp_resumes_from_the_previous_one(tiny_shards, tmp_path, uninterrupted):
    step = 3 * fault_step(2, 7)  # a checkpoint step (every 3)
    program = [sys.executable, "-c", KILL_IN_CHECKPOINT.format(step=step)] + command(tiny_shards, tmp_path)[3:]
    killed = subprocess.run(program, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / f"step_{step:08d}.tmp" / "trainer.pt").is_file(), "killed with the folder still .tmp"
    assert CheckpointManager(checkpoints, 2).saved()[-1][0] == step - 3
    subprocess.run(command(tiny_shards, tmp_path), check=True, capture_output=True, timeout=300)
    assert last_losses(tmp_path) == uninterrupted
    assert not (checkpoints / f"step_{step:08d}.tmp").exists(), "the next save of that step replaced it"


def test_sigterm_writes_a_checkpoint_before_exiting(tiny_shards, tmp_path, uninterrupted):
    process = subprocess.Popen(command(tiny_shards, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for_steps(tmp_path, 5, process)
    os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: the whole group, loader workers included
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    logged = max(r["step"] for r in read_metrics(tmp_path))
    saved = CheckpointManager(tmp_path / "checkpoints", 2).saved()
    assert saved[-1][0] == logged, "the checkpoint holds the last step taken"
    assert f"checkpoint written at step {logged}" in stderr
    subprocess.run(command(tiny_shards, tmp_path), check=True, capture_output=True, timeout=300)
    assert last_losses(tmp_path) == uninterrupted


def train(shards, run_dir, **extra):
    trainer = Trainer(load(TrainConfig, None, tiny_overrides(shards, run_dir, **extra)))
    trainer.train()
    return trainer


def test_a_nonfinite_loss_stops_with_the_step_named_and_the_checkpoint_intact(tiny_shards, tmp_path):
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) \(mean over all ranks\) at step \d+; "
                                                r"the last checkpoint .* is intact"):
        train(tiny_shards, tmp_path, **{"optim.lr": "1e12", "optim.clip_grad": "null", "schedule.warmup_epochs": "0",
                                        "checkpoint.every_steps": "1", "schedule.max_steps": "40"})
    state, _ = CheckpointManager(tmp_path / "checkpoints", 2).load_latest()
    assert state["step"] >= 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skip_mode_counts_nonfinite_steps_up_to_the_limit(tiny_shards, tmp_path):
    with pytest.raises(FloatingPointError, match="more than engine.max_nonfinite_steps=3"):
        train(tiny_shards, tmp_path, **{"optim.lr": "1e12", "optim.clip_grad": "null", "schedule.warmup_epochs": "0",
                                        "engine.nonfinite_loss": "skip", "engine.max_nonfinite_steps": "3",
                                        "schedule.max_steps": "40"})
    records = read_metrics(tmp_path)
    assert [r["nonfinite_steps"] for r in records if r["loss"] is None][:3] == [1, 2, 3]


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_shards, tmp_path, caplog):
    train(tiny_shards, tmp_path, **{"schedule.max_steps": "8", "checkpoint.every_steps": "4"})
    latest = tmp_path / "checkpoints" / "step_00000008" / "trainer.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    trainer = Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **{"schedule.max_steps": "8"})))
    with caplog.at_level(logging.WARNING):
        trainer.resume()
    assert trainer.step == 4
    assert "step_00000008 is unreadable" in caplog.text


def test_a_failing_checkpoint_write_is_a_clear_error_and_keeps_the_previous_one(tiny_shards, tmp_path):
    train(tiny_shards, tmp_path, **{"schedule.max_steps": "4", "checkpoint.every_steps": "4"})
    (tmp_path / "checkpoints" / "step_00000008.tmp").write_text("")  # the filesystem refuses the next write
    with pytest.raises(OSError, match=r"could not write checkpoint .*step_00000008 .*the previous checkpoint "
                                      r".*step_00000004 is intact"):
        train(tiny_shards, tmp_path, **{"schedule.max_steps": "8", "checkpoint.every_steps": "4"})
    state, path = CheckpointManager(tmp_path / "checkpoints", 2).load_latest()
    assert path.name == "step_00000004" and state["step"] == 4


def test_a_checkpoint_is_made_durable_file_by_file_without_flushing_the_node(tiny_shards, tmp_path, monkeypatch):
    """fsync of every file written, of the folder before the rename and of its parent after it; no os.sync."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "sync", lambda: events.append(("sync", None)))
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b)))
    train(tiny_shards, tmp_path, **{"schedule.max_steps": "4", "checkpoint.every_steps": "4"})
    checkpoints = tmp_path / "checkpoints"
    final, tmp = checkpoints / "step_00000004", checkpoints / "step_00000004.tmp"
    assert ("sync", None) not in events, "os.sync flushes every filesystem of the node"
    synced = [path for kind, path in events if kind == "fsync"]
    assert str(tmp / "trainer.pt") in synced and str(tmp) in synced
    rename = events.index(("rename", str(final)))
    assert events.index(("fsync", str(tmp))) < rename < events.index(("fsync", str(checkpoints)))


FAIL_IN_EVALUATION = """
import sys
from trivit.cli import main
from trivit.engine import evaluation
calls = [0]
shared = evaluation.sum_tensor
def sum_then_fail(tensor):
    calls[0] += 1
    if calls[0] == 3:  # inside the evaluation's loop, its loader workers running
        raise RuntimeError("injected evaluation error")
    return shared(tensor)
evaluation.sum_tensor = sum_then_fail
sys.exit(main(sys.argv[1:]))
"""


def test_an_error_during_evaluation_exits_within_a_bound(tiny_shards, tmp_path):
    """Loader workers that ignore SIGTERM must not keep a failed run alive."""
    overrides = tiny_overrides(tiny_shards, tmp_path, **{"schedule.eval_every_steps": "2", "schedule.max_steps": "6"})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", FAIL_IN_EVALUATION, "train", *overrides], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "injected evaluation error" in result.stderr
    assert time.monotonic() - started < 60


def _runs_sleep(process) -> bool:
    """Whether a descendant of ``process`` is the ``sleep`` program itself."""
    import psutil

    for child in process.children(recursive=True):
        try:
            if child.cmdline()[:1] == ["sleep"]:
                return True
        except psutil.Error:  # gone meanwhile
            continue
    return False


def test_ctrl_c_during_evaluation_exits_within_a_bound(tiny_shards, tmp_path):
    import psutil

    slow_val = f"pipe:sleep 30 && cat {tiny_shards}/val-000000.tar"
    overrides = tiny_overrides(tiny_shards, tmp_path, **{"data.val_urls": slow_val, "schedule.eval_every_steps": "2",
                                                        "schedule.max_steps": "6", "data.num_workers": "1"})
    log = tmp_path / "stderr.txt"  # a file, not a pipe: the shard's orphaned pipe would hold a pipe open
    with log.open("w") as stderr_file:
        process = subprocess.Popen([sys.executable, "-m", "trivit", "train", *overrides], stdout=subprocess.DEVNULL,
                                   stderr=stderr_file, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not _runs_sleep(psutil.Process(process.pid)):  # the pipe of the validation shard, not the forked
            assert process.poll() is None and time.monotonic() < deadline, "evaluation never started"  # workers,
            time.sleep(0.05)  # whose command line (the trainer's) names it too
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)  # Ctrl-C: to the training process, while its loader waits
        process.wait(timeout=60)
        assert time.monotonic() - interrupted < 30
        assert process.returncode == 130 and "interrupted" in log.read_text()
    finally:
        for child in psutil.Process().children(recursive=True):
            child.kill()
