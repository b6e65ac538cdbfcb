"""launch/slurm/train.sbatch run by bash with Slurm's commands stubbed: what it starts, and what it does
when the time limit nears (USR1) and when the job is pre-empted."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "slurm" / "train.sbatch"

SRUN = """#!/bin/bash
# As the real srun: starts the step's task; a SIGTERM to srun itself becomes SIGKILL of the task.
echo "srun $*" >> "$STUB_LOG"
bash -c 'echo $$ > "$STUB_TASK"; trap "echo checkpoint >> \\"$STUB_LOG\\"; exit 143" TERM
         n=$(cat "$STUB_RUNS" 2>/dev/null || echo 0); echo $((n + 1)) > "$STUB_RUNS"
         [ "$n" -lt "${STUB_FAILURES:-0}" ] && exit 1
         [ -n "${STUB_FINISH:-}" ] && exit 0
         while :; do sleep 0.1; done' &
task=$!
trap 'echo "srun: TERM -> KILL" >> "$STUB_LOG"; kill -KILL $task; wait $task; exit 137' TERM
wait $task
"""
SCANCEL = """#!/bin/bash
# As the real scancel without --batch/--full: signals the job's steps' tasks, not the batch script.
echo "scancel $*" >> "$STUB_LOG"
[ "$1" = --signal=TERM ] && kill -TERM "$(cat "$STUB_TASK")"
"""
SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then printf 'gpu%03d\\n' $(seq 17 5000); else echo "scontrol $*" >> "$STUB_LOG"; fi
"""
"""A long node list: a reader that stops after the first line would kill the writer with SIGPIPE."""


def start(tmp_path: Path, *overrides: str, **env_extra: str) -> tuple[subprocess.Popen, Path]:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("scancel", SCANCEL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", VENV=str(Path(sys.executable).parents[1]),
               STUB_LOG=str(log), STUB_TASK=str(tmp_path / "task.pid"), STUB_RUNS=str(tmp_path / "runs"),
               SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[017-018]",
               SLURM_CPUS_PER_TASK="16", PYTHONPATH=str(ROOT), **env_extra)
    process = subprocess.Popen(["bash", str(SCRIPT), "configs/demo.yaml", *overrides], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (log.is_file() and "srun" in log.read_text() and (tmp_path / "task.pid").is_file()):
        if process.poll() is not None:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return process, log


def test_the_sbatch_header_sets_up_requeue_logs_and_nodes():
    header = [line.split(None, 1)[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--signal=B:USR1@900" in header and "--requeue" in header
    assert "--open-mode=append" in header and "--wait-all-nodes=1" in header
    output = next(option for option in header if option.startswith("--output="))
    assert "/" not in output, "Slurm opens the log before the script could create a folder for it"


def test_torchrun_per_node_with_the_runs_grace(tmp_path):
    process, log = start(tmp_path, "engine.timeout_s=1234")
    try:
        srun = log.read_text().splitlines()[0]
        assert srun.startswith("srun --kill-on-bad-exit=1 torchrun --shutdown-timeout 1234 --nnodes 2 --nproc-per-node 8")
        assert "--rdzv-endpoint gpu017:29500 --rdzv-id 77 -m trivit train --config configs/demo.yaml" in srun
        assert srun.endswith("engine.timeout_s=1234")
    finally:
        process.kill()
        process.wait()


def test_the_time_limit_signal_checkpoints_then_requeues(tmp_path):
    """USR1 (--signal=B:USR1@900): the step's tasks get SIGTERM through scancel and write their checkpoint
    (srun itself, signalled, would SIGKILL them); once the step exits 143 the job is requeued."""
    process, log = start(tmp_path)
    time.sleep(0.3)  # the task's trap is set
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert log.read_text().splitlines()[1:] == ["scancel --signal=TERM 77", "checkpoint", "scontrol requeue 77"]
    assert "time limit near: checkpointing, then requeueing job 77" in stderr


def test_preemption_fails_the_step_and_slurm_requeues(tmp_path):
    process, log = start(tmp_path)
    time.sleep(0.3)
    os.kill(int((tmp_path / "task.pid").read_text()), signal.SIGTERM)  # pre-emption reaches the step: exit 143
    process.communicate(timeout=60)
    assert process.returncode == 143 and "scontrol requeue" not in log.read_text()
    assert log.read_text().count("srun ") == 1, "a pre-empted step is not restarted in the allocation"


def test_a_failed_step_restarts_from_its_checkpoint(tmp_path):
    """Two failures (an NCCL timeout, an OOM), then the run finishes: three srun steps, exit 0."""
    process, log = start(tmp_path, STUB_FAILURES="2", STUB_FINISH="1")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert log.read_text().count("srun ") == 3
    assert "restarting it from its last checkpoint (2 of 3)" in stderr


def test_restarts_are_bounded(tmp_path):
    process, log = start(tmp_path, STUB_FAILURES="100", MAX_RESTARTS="2")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and log.read_text().count("srun ") == 3
    assert "not restarting (restarts used: 2 of 2)" in stderr
