"""Starting ``python -m trivit`` in 2 real processes under each launcher, for the distributed tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOLERANCE = 1e-5
"""Largest loss difference allowed against the single-process reference (observed: about 1e-7, float32 rounding)."""

DISTRIBUTED = {
    "data.num_workers": "1", "data.mixup": "0", "data.cutmix": "0", "data.re_prob": "0",
    "model.drop_path_rate": "0", "optim.ema_decay": "null", "optim.lr": "3e-3", "schedule.warmup_epochs": "0",
    "sparsity.tokens.keep_rate": "0.5", "sparsity.tokens.locations": "[0, 1]", "sparsity.tokens.fuse": "true",
    "sparsity.attention.keep_rate": "0.5", "sparsity.schedule.start_epochs": "0.1",
    "sparsity.schedule.span_epochs": "0.3", "sparsity.schedule.levels": "4", "sparsity.examples.policy": "forgetting",
    "sparsity.examples.refresh_every_epochs": "1", "sparsity.examples.remove_fraction": "0.125",
}
"""No randomness that differs by rank (mixup, drop-path, erasing), so 2 ranks can equal 1 process; a
quantised ramp, so that compiled runs (which quantise it by default) train at the same rates."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(kind: str, port: int) -> list[str]:
    """The command that starts 2 processes of ``python -m trivit``."""
    if kind == "torchrun":
        return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                str(port), "-m", "trivit"]
    if kind == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_nodes", "1", "--num_gpus", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), "--no_local_rank", "--module", "trivit"]
    accelerate = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                  "--main_process_port", str(port)]
    if kind == "accelerate":
        return accelerate + ["--multi_gpu", "--num_machines", "1", "-m", "trivit"]
    return accelerate + ["--config_file", str(ROOT / "launch" / "accelerate" / kind), "-m", "trivit"]


def launch_command(kind: str, shards: Path, run_dir: Path, **overrides: str) -> tuple[list[str], dict[str, str]]:
    """Command and environment of a 2-process ``trivit train`` on ``tiny_shards``."""
    args = tiny_overrides(shards, run_dir, **dict(DISTRIBUTED, **overrides))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return launcher(kind, free_port()) + ["train", *args], env


def train_cli(kind: str, shards: Path, run_dir: Path, **overrides: str) -> subprocess.CompletedProcess:
    command, env = launch_command(kind, shards, run_dir, **overrides)
    return subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
