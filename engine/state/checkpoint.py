"""Checkpoint folders: written atomically by all ranks, the last K kept, the newest readable one found on resume.

A checkpoint is ``<run_dir>/checkpoints/step_XXXXXXXX/`` holding ``trainer.pt`` (written by
the main rank: step, schedules, data position, sparsity state, every rank's RNG, and for
single/DDP the model and optimizer) plus whatever the backend writes beside it (FSDP's
sharded state dict, DeepSpeed's checkpoint). Everything is written into ``step_XXXXXXXX.tmp/``
and renamed once every rank has finished: a crash mid-write leaves at most a ``.tmp`` folder,
which is never taken for a checkpoint. Durability without flushing the whole node: each rank
fsyncs the files it wrote, the main rank fsyncs the folder's directories before the rename and
the parent directory after it, so a checkpoint that exists by name survives a power loss. With
several nodes, ``run_dir`` must be on a filesystem all of them share.
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

from trivit.engine.distributed import all_ranks_ok, barrier, broadcast_object, gather_objects

CHECKPOINT_RE = re.compile(r"^step_(\d{8,})$")
TRAINER_FILE = "trainer.pt"
REQUIRED_KEYS = ("step", "backend", "model_name", "ranks")
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
            before = file_stamps(tmp)
            state = write(tmp)
            if self.is_main:
                torch.save(state, tmp / TRAINER_FILE)
            for file in changed_files(tmp, before):
                fsync_path(file)

        def complete() -> None:
            if self.is_main:
                for directory in [tmp, *(d for d in sorted(tmp.rglob("*")) if d.is_dir())]:
                    fsync_path(directory)
                if path.exists():
                    shutil.rmtree(path)
                os.replace(tmp, path)
                fsync_path(self.folder)

        error = None
        for phase in (prepare, write_all, complete):  # every rank votes after each phase, so none waits alone
            error = _attempt(phase)
            if not all_ranks_ok(error is None, self.device):
                if self.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                self._raise_write_error(path, error)
        if self.is_main:
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
            except ValueError as error:
                log.warning("%s; trying the previous one", error)
            except OSError as error:
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, error)
        return None


Found = tuple[dict[str, Any], Path]


def agreed_resume(pick: Callable[[], Found | None], is_main: bool) -> Found | None:
    """The checkpoint every rank resumes from, read by every rank; all ranks call this.

    The main rank alone chooses (``pick``: the newest checkpoint it can read, or the one named)
    and broadcasts its choice, or its error, so that every rank resumes from the same step or
    stops with the same reason. A rank that cannot read the chosen checkpoint (a filesystem it
    does not share) stops every rank, naming itself.
    """
    choice: Path | Exception | None = None
    picked: Found | None = None
    if is_main:
        try:
            picked = pick()
            choice = picked[1] if picked else None
        except (OSError, ValueError) as error:
            choice = error
    choice = broadcast_object(choice)
    if isinstance(choice, Exception):
        raise choice
    if choice is None:
        return None
    error = None
    if picked is None:
        try:
            picked = load_trainer_state(choice), choice
        except (OSError, ValueError) as failure:
            error = str(failure)
    failures = [(rank, reason) for rank, reason in enumerate(gather_objects(error)) if reason]
    if failures:
        rank, reason = failures[0]
        raise ValueError(f"rank {rank} cannot read checkpoint {choice}, which the main rank resumes from ({reason}); "
                         "every rank must see the same run_dir (a filesystem all nodes share)")
    return picked


def pick_checkpoint(resume: str, checkpoints: CheckpointManager) -> Found | None:
    """The checkpoint ``resume`` asks for ('auto', 'never' or a folder) in ``checkpoints``; None: start afresh."""
    if resume == "never":
        if checkpoints.saved():
            raise ValueError(f"resume=never but {checkpoints.folder} already holds checkpoints; "
                             "use a new run_dir, or resume=auto to continue that run")
        return None
    if resume == "auto":
        return checkpoints.load_latest()
    path = checkpoint_folder(resume)
    if not (path / TRAINER_FILE).is_file():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint (a step_XXXXXXXX folder holding "
                                "trainer.pt); use 'auto', 'never' or a checkpoint folder")
    state = load_trainer_state(path)
    check_no_later_checkpoints(checkpoints, path, state["step"])
    return state, path


def check_no_later_checkpoints(checkpoints: CheckpointManager, path: Path, step: int) -> None:
    """Branching from an earlier checkpoint into a run_dir that holds later ones would mix two runs
    (metrics, ``resume=auto``) and the keep-last rule could delete the branch's own checkpoints."""
    later = [folder.name for saved_step, folder in checkpoints.saved() if saved_step > step]
    if later:
        raise ValueError(f"resume={str(path)!r} is at step {step}, but {checkpoints.folder} already holds later "
                         f"checkpoints ({', '.join(later)}); continuing here would mix two runs. Branch into a "
                         f"new run_dir (run_dir=NEW resume={path}), or resume=auto to continue from {later[-1]}")


def check_compatible(state: dict[str, Any], source: Path, model_name: str, backend: str,
                     data_settings: dict[str, Any]) -> None:
    """A checkpoint can continue this run: the same model, backend, world size and data position settings."""
    if state["model_name"] != model_name:
        raise ValueError(f"checkpoint {source} is of model {state['model_name']!r}, this run builds "
                         f"{model_name!r}; use a new run_dir or resume=never")
    saved = state["data"]  # older checkpoints lack the later keys: those are not compared
    changed = {k: (saved[k], v) for k, v in data_settings.items() if k in saved and saved[k] != v}
    if "classes" in changed or "index_fingerprint" in changed:
        old, new = changed.get("classes", (None, None))
        detail = f"classes {old} -> {new}" if "classes" in changed else "the same classes, other shards or counts"
        raise ValueError(f"the training data changed under this run: checkpoint {source} was trained on other data "
                         f"({detail}). Point data.train_urls back at that data to continue, or start a new run_dir "
                         f"(model.init_from={source} starts from its weights)")
    if "world_size" in changed:
        old, new = changed["world_size"]
        raise ValueError(f"checkpoint {source} was written by {old} processes, this run has {new}; relaunch "
                         f"with {old} processes to resume it, or start a new run_dir")
    if state["backend"] != backend:
        raise ValueError(f"checkpoint {source} was written by backend {state['backend']!r}, this run uses "
                         f"{backend!r}; set engine.backend={state['backend']}, or start a new run "
                         f"from its weights (trivit export {source})")
    if changed:
        detail = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise ValueError(f"checkpoint {source} was written with other data settings ({detail}); the data "
                         "position cannot be carried over: restore those values or start a new run_dir")


def _attempt(action: Callable[[], None]) -> Exception | None:
    """Run ``action``; the write error it raised, if any."""
    try:
        action()
    except (OSError, RuntimeError) as error:
        return error
    return None


def file_stamps(folder: Path) -> dict[Path, tuple[int, int]]:
    """(modification time, size) of every file under ``folder``."""
    stamps = {}
    for file in folder.rglob("*"):
        if file.is_file():
            stat = file.stat()
            stamps[file] = (stat.st_mtime_ns, stat.st_size)
    return stamps


def changed_files(folder: Path, before: dict[Path, tuple[int, int]]) -> list[Path]:
    """Files under ``folder`` that are new or changed since ``before`` (this rank's, and any written meanwhile)."""
    return [file for file, stamp in file_stamps(folder).items() if before.get(file) != stamp]


def fsync_path(path: Path) -> None:
    """Flush one file's or directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_folder(path: str | Path) -> Path:
    """A checkpoint folder from its path or its ``trainer.pt``."""
    path = Path(path)
    return path.parent if path.name == TRAINER_FILE else path


def load_trainer_state(folder: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's ``trainer.pt`` (tensors and plain Python values only: nothing is unpickled as code);
    ``mmap`` maps its tensors rather than reading them, for a caller that reads a few plain entries.

    A missing file raises ``FileNotFoundError``; any file that is not a readable trivit checkpoint
    (truncated, overwritten with garbage, another program's) raises ``ValueError`` naming it.
    """
    path = checkpoint_folder(folder) / TRAINER_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - unpickling garbage can raise nearly anything
        raise ValueError(f"checkpoint {path.parent} is unreadable ({type(error).__name__}: {error})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"checkpoint {path.parent} is unreadable: {TRAINER_FILE} is not a trivit checkpoint "
                         f"(no {', '.join(missing)})")
    return state
