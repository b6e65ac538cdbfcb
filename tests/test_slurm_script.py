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
echo "srun $*" >> "$STUB_LOG"
sleep 60 > /dev/null 2>&1 &
trap 'echo TERM >> "$STUB_LOG"; kill $!; exit 143' TERM
wait
"""
SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then printf 'gpu%03d\\n' $(seq 17 5000); else echo "scontrol $*" >> "$STUB_LOG"; fi
"""
"""A long node list: a reader that stops after the first line would kill the writer with SIGPIPE."""


def start(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", VENV=str(Path(sys.executable).parents[1]),
               STUB_LOG=str(log), SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[017-018]",
               SLURM_CPUS_PER_TASK="16", PYTHONPATH=str(ROOT))
    process = subprocess.Popen(["bash", str(SCRIPT), "configs/demo.yaml", *overrides], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (log.is_file() and "srun" in log.read_text()):
        assert process.poll() is None, process.communicate()
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
    process, log = start(tmp_path)
    process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@900 sends the batch script
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert log.read_text().splitlines()[1:] == ["TERM", "scontrol requeue 77"], "stop the run first, then requeue"
    assert "time limit near: checkpointing, then requeueing job 77" in stderr


def test_a_failed_run_fails_the_job(tmp_path):
    process, log = start(tmp_path)
    for child in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split():
        os.kill(int(child), signal.SIGTERM)  # pre-emption reaches the step: srun exits 143
    process.communicate(timeout=60)
    assert process.returncode == 143 and "scontrol requeue" not in log.read_text()
