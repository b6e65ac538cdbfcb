"""Checkpoint files: written atomically, the last K kept, the newest readable one found on resume."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointManager:
    """``<run_dir>/checkpoints/step_XXXXXXXX.pt``, one file per saved step.

    A file is written to ``<name>.tmp``, flushed to disk, then renamed: a crash mid-write
    leaves at most a ``.tmp`` file, which is never taken for a checkpoint.
    """

    def __init__(self, folder: str | Path, keep: int):
        self.folder = Path(folder)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def saved(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint file, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), self.folder / m.group(0)) for m in map(CHECKPOINT_RE.match, os.listdir(self.folder)) if m]
        return sorted(found)

    def save(self, state: dict[str, Any], step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(step)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as error:
            if tmp.is_file():
                tmp.unlink()
            previous = self.saved()
            kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
            raise OSError(f"could not write checkpoint {path} ({error}); {kept}. Free disk space or fix the "
                          f"folder's permissions, then resume") from error
        for _, old in self.saved()[: -self.keep]:
            old.unlink()
        return path

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads; unreadable ones are skipped with a warning."""
        for _, path in reversed(self.saved()):
            try:
                return load_checkpoint(path), path
            except (RuntimeError, EOFError, OSError, ValueError) as error:
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, error)
        return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by trivit (tensors and plain Python values only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
