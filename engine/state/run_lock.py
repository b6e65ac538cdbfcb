"""One training run per run_dir: the main rank holds a lock on ``<run_dir>/.lock`` while it trains.

Two runs on one folder would interleave their metrics and write checkpoints over each other.
The lock is a POSIX record lock (``trivit.locks``), so it is released however the holder exits
(a killed run leaves no stale lock), and all ranks agree on the verdict so a refused multi-rank
launch stops whole.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from trivit.engine.distributed import World, all_ranks_ok
from trivit.locks import InUse, exclusive_or_fail

LOCK_FILE = ".lock"
FIX = "another trivit run is training there. Wait for it to finish, or give this run another run_dir"


def _lock(run_dir: Path):
    return exclusive_or_fail(run_dir / LOCK_FILE, f"run_dir {str(run_dir)!r}")


def lock_run_dir(run_dir: Path, world: World, device: torch.device) -> ExitStack:
    """The held lock (close the returned stack to release it); every rank raises if it is taken."""
    stack = ExitStack()
    error: InUse | None = None
    if world.is_main:
        try:
            stack.enter_context(_lock(run_dir))
        except InUse as taken:
            error = taken
    if not all_ranks_ok(error is None, device):
        stack.close()
        detail = str(error) if error else f"run_dir {str(run_dir)!r} is in use by another process (see rank 0)"
        raise InUse(f"{detail}: {FIX}")
    return stack


def check_run_dir_free(run_dir: Path, world: World) -> None:
    """On the main rank, raise as :func:`lock_run_dir` would, without keeping the lock nor creating
    anything (``--dry-run``; no collective, so the other ranks simply end)."""
    if world.is_main and (run_dir / LOCK_FILE).exists():
        try:
            with _lock(run_dir):
                pass
        except InUse as taken:
            raise InUse(f"{taken}: {FIX}") from None
