"""What a run writes, by name, and how to find and read it back: the one module the model's builders,
its importer and its exporter all read (so that none of them imports another to learn a file's name)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trivit.engine.state.checkpoint import CheckpointManager, checkpoint_folder, load_trainer_state
from trivit.sparse.pruned import PrunedArch, create_pruned_vit, strip_state, unit_axes

WEIGHTS_FILE = "model.safetensors"
"""The final weights of a run, in its run_dir (timm's state_dict, safetensors)."""
ARCH_FILE = "arch.json"
GLCA_FILE = "glca.safetensors"
"""A DCAL model's GLCA branch, written beside its exported backbone (``block.*``, ``norm.*``, ``head.*``)."""
UNIT_MASKS = "unit_masks"
"""The entry of a pruning run's objective state that holds its masks (``trivit prune``)."""


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint folder (or its trainer.pt), else the newest under a run_dir."""
    path = checkpoint_folder(path)
    if (path / "trainer.pt").is_file():
        return path
    saved = CheckpointManager(path / "checkpoints", keep=1).saved()
    if not saved:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (with trainer.pt) nor a run_dir with checkpoints")
    return saved[-1][1]


def source_arch(source: str | None) -> PrunedArch | None:
    """The pruned architecture of ``source`` (a run_dir, checkpoint folder or weights file), None for a timm one."""
    if source is None or source == "timm":
        return None
    path = Path(source).expanduser()
    if path.is_file() and path.name != "trainer.pt":
        beside = path.parent / ARCH_FILE
        return PrunedArch.load(beside) if beside.is_file() else None
    if not path.exists():
        return None
    _, arch = exported_state({}, load_trainer_state(find_checkpoint(path), mmap=True))
    return arch


def exported_state(weights: Mapping[str, torch.Tensor],
                   trainer_state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], PrunedArch | None]:
    """A checkpoint's weights as exported, and their architecture: a pruning run's masked units stripped."""
    record = trainer_state.get("arch")
    if record is None:
        return dict(weights), None
    arch = PrunedArch(**record["arch"])
    objective = trainer_state.get("objective") or {}
    masks = objective.get(UNIT_MASKS) if isinstance(objective, Mapping) else None
    if masks is None:
        return dict(weights), arch
    if not weights:
        return {}, arch.kept(masks)
    with torch.device("meta"):
        model = create_pruned_vit(arch, **record["timm_kwargs"])
    return strip_state(weights, unit_axes(model, arch), masks), arch.kept(masks)
