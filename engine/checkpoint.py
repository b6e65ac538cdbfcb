"""Checkpoint folders: written atomically by all ranks, the last K kept, the newest readable one found on resume.

A checkpoint is ``<run_dir>/checkpoints/step_XXXXXXXX/`` holding ``trainer.pt`` (written by
the main rank: step, schedules, data position, sparsity state, every rank's RNG, and for
single/DDP the model and optimizer) plus whatever the backend writes beside it (FSDP's
sharded state dict, DeepSpeed's checkpoint). Everything is written into ``step_XXXXXXXX.tmp/``,
synced to disk, and renamed once every rank has finished: a crash mid-write leaves at most a
``.tmp`` folder, which is never taken for a checkpoint. With several nodes, ``run_dir`` must
be on a filesystem all of them share.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trivit.engine.distributed import all_ranks_ok, barrier

CHECKPOINT_RE = re.compile(r"^step_(\d{8,})$")
TRAINER_FILE = "trainer.pt"
log = logging.getLogger(__name__)


class CheckpointManager:
    def __init__(self, folder: str | Path, keep: int, is_main: bool = True, device: torch.device | None = None):
        self.folder = Path(folder)
        self.keep = keep
        self.is_main = is_main
        self.device = device or torch.device("cpu")

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def saved(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), self.folder / m.group(0)) for m in map(CHECKPOINT_RE.match, os.listdir(self.folder)) if m]
        return sorted(found)

    def save(self, step: int, write: Callable[[Path], dict[str, Any]]) -> Path:
        """Write checkpoint ``step``: every rank calls this; ``write(folder)`` writes the backend's
        files (a collective) and returns the main rank's ``trainer.pt`` content."""
        path = self.path(step)
        tmp = path.with_name(path.name + ".tmp")

        def prepare() -> None:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def write_all() -> None:
            state = write(tmp)
            if self.is_main:
                _save_synced(state, tmp / TRAINER_FILE)
            os.sync()

        error = _attempt(prepare)
        ok = all_ranks_ok(error is None, self.device)  # every rank votes after each phase, so none waits alone
        if ok:
            error = _attempt(write_all)
            ok = all_ranks_ok(error is None, self.device)
        if not ok:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self._raise_write_error(path, error)
        if self.is_main:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            for _, old in self.saved()[: -self.keep]:
                shutil.rmtree(old)
        barrier()
        return path

    def _raise_write_error(self, path: Path, error: Exception | None) -> None:
        previous = self.saved()
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
        cause = f"{error}" if error is not None else "another rank failed to write its part"
        raise OSError(f"could not write checkpoint {path} ({cause}); {kept}. Free disk space or fix the "
                      f"folder's permissions, then resume") from error

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """The ``trainer.pt`` state and folder of the newest checkpoint that loads; unreadable ones
        are skipped with a warning."""
        for _, path in reversed(self.saved()):
            try:
                return load_trainer_state(path), path
            except (RuntimeError, EOFError, OSError, ValueError) as error:
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, error)
        return None


def _attempt(action: Callable[[], None]) -> Exception | None:
    """Run ``action``; the write error it raised, if any."""
    try:
        action()
    except (OSError, RuntimeError) as error:
        return error
    return None


def _save_synced(state: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_folder(path: str | Path) -> Path:
    """A checkpoint folder from its path or its ``trainer.pt``."""
    path = Path(path)
    return path.parent if path.name == TRAINER_FILE else path


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's ``trainer.pt`` (tensors and plain Python values only: nothing is unpickled as code)."""
    return torch.load(checkpoint_folder(folder) / TRAINER_FILE, map_location="cpu", weights_only=True)
