"""A rank of a 2-process run killed with SIGKILL mid-training, for real.

Under torchrun the launcher stops the survivor; without a launcher trivit itself must: the
survivor's next collective fails (or times out after engine.timeout_s) and it exits with an
error. Either way nothing hangs, and ``resume=auto`` continues from the last checkpoint with
the uninterrupted run's losses.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import fault_step, tiny_overrides
from tests.faults.test_process_faults import last_losses, wait_for_steps
from tests.launchers import DISTRIBUTED, ROOT, free_port, launch_command
from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.state.checkpoint import CheckpointManager
from trivit.engine.trainer import Trainer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RUN = {"engine.backend": "ddp", "schedule.max_steps": "16", "checkpoint.every_steps": "3"}
BOUND_S = 60
"""The survivor must be gone this long after the kill (engine.timeout_s is 30 in these runs)."""


def rank_process(parent: psutil.Process, rank: int) -> psutil.Process:
    """The training process of ``rank`` among ``parent``'s descendants (read from its environment)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in parent.children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "trivit" in " ".join(child.cmdline()):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.1)
    raise TimeoutError(f"no process of rank {rank}")


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted_ddp")
    command, env = launch_command("torchrun", tiny_shards, run_dir, **RUN)
    subprocess.run(command, check=True, capture_output=True, timeout=300, cwd=ROOT, env=env)
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[int, float]:
    return last_losses(uninterrupted_run)


def test_kill_9_of_one_rank_under_torchrun_then_resume(tiny_shards, tmp_path, uninterrupted):
    kill_after = fault_step(4, 12)
    command, env = launch_command("torchrun", tiny_shards, tmp_path, **RUN)
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    victim = rank_process(psutil.Process(launcher.pid), 1)
    wait_for_steps(tmp_path, kill_after, launcher)
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=BOUND_S)
    assert time.monotonic() - killed < BOUND_S
    assert launcher.returncode != 0 and "exitcode  : -9" in stderr, stderr[-2000:]
    saved = CheckpointManager(tmp_path / "checkpoints", 3).saved()
    assert saved, "a checkpoint was written before the kill (a half-written step_*.tmp may remain; it is ignored)"

    command, env = launch_command("torchrun", tiny_shards, tmp_path, **RUN)
    subprocess.run(command, check=True, capture_output=True, timeout=300, cwd=ROOT, env=env)
    resumed = last_losses(tmp_path)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 17))
    assert resumed == uninterrupted, f"killed after step {kill_after}, resumed from step {saved[-1][0]}"


def test_sigterm_under_torchrun_stops_both_ranks_at_one_step_with_a_checkpoint(tiny_shards, tmp_path, uninterrupted):
    command, env = launch_command("torchrun", tiny_shards, tmp_path, **RUN)
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    wait_for_steps(tmp_path, 5, launcher)
    launcher.send_signal(signal.SIGTERM)  # what Slurm and Kubernetes send to the launcher on pre-emption
    _, stderr = launcher.communicate(timeout=BOUND_S)
    logged = max(last_losses(tmp_path))
    saved = CheckpointManager(tmp_path / "checkpoints", 3).saved()
    assert saved[-1][0] == logged < 16, f"the checkpoint holds the last step taken\n{stderr[-2000:]}"
    assert f"checkpoint written at step {logged}" in stderr

    command, env = launch_command("torchrun", tiny_shards, tmp_path, **RUN)
    subprocess.run(command, check=True, capture_output=True, timeout=300, cwd=ROOT, env=env)
    assert last_losses(tmp_path) == uninterrupted


def test_without_a_launcher_the_surviving_rank_exits_with_an_error(tiny_shards, tmp_path):
    """No torchrun agent to clean up: trivit's own collectives must notice the dead peer."""
    command, env = launch_command("torchrun", tiny_shards, tmp_path, **dict(RUN, **{"engine.timeout_s": "30"}))
    train_args = command[command.index("train"):]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    ranks = [subprocess.Popen([sys.executable, "-m", "trivit", *train_args], cwd=ROOT, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in (0, 1)]
    try:
        wait_for_steps(tmp_path, 3, ranks[0])
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=BOUND_S)
        assert time.monotonic() - killed < BOUND_S
        assert ranks[0].returncode not in (0, None), "the survivor reports failure"
        assert any(word in stderr for word in ("Connection closed by peer", "Connection reset", "timed out",
                                                "Timeout")), stderr[-2000:]
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()


def test_a_two_process_checkpoint_is_refused_by_one_process(tiny_shards, tmp_path, uninterrupted_run):
    checkpoint = CheckpointManager(uninterrupted_run / "checkpoints", 3).saved()[-1][1]
    settings = {**DISTRIBUTED, **RUN, "engine.backend": "auto"}
    overrides = tiny_overrides(tiny_shards, tmp_path, resume=str(checkpoint), **settings)
    with pytest.raises(ValueError, match="was written by 2 processes, this run has 1; relaunch with 2 processes"):
        Trainer(load(TrainConfig, None, overrides)).train()
