"""One file of model weights from any checkpoint, loadable by ``timm.create_model`` (strict).

Works offline, in one process, for every backend's format: single/DDP checkpoints hold the
weights already; FSDP's sharded state dict and DeepSpeed's ZeRO partitions are consolidated.
The file is safetensors, which timm reads with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, ...)``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from trivit.engine.backends import export_weights
from trivit.engine.model.artefacts import ARCH_FILE, GLCA_FILE, exported_state
from trivit.engine.state.checkpoint import checkpoint_folder, load_trainer_state
from trivit.sparse.dcal import GLCA_PREFIX, entries_under, split_branch
from trivit.sparse.pruned import PrunedArch


def consolidated_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's weights (fp32, contiguous, on the CPU) from a checkpoint folder; a pruning
    run's are those of its architecture so far (the masked units removed)."""
    return consolidated(checkpoint)[0]


def consolidated(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], PrunedArch | None]:
    """:func:`consolidated_weights` and their pruned architecture (None for a timm one)."""
    folder = checkpoint_folder(checkpoint)
    state = load_trainer_state(folder)
    weights = export_weights(state["backend"], folder, state)
    weights = {name: tensor.detach().float().contiguous().cpu() for name, tensor in weights.items()}
    return exported_state(weights, state)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the consolidated weights of ``checkpoint`` to ``out`` (safetensors), atomically: timm's
    state_dict of the backbone. Beside it go what ``model.init_from`` finds there: a pruned model's
    architecture (``arch.json``) and a DCAL model's GLCA branch (``glca.safetensors``; DCAL's
    training-only loss weights are not exported)."""
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: trivit writes safetensors; name the file *.safetensors (timm reads it by "
                         "that suffix)")
    out.parent.mkdir(parents=True, exist_ok=True)
    weights, arch = consolidated(checkpoint)
    glca = entries_under(weights, GLCA_PREFIX)
    weights = split_branch(weights)[0]
    if arch is not None:
        arch.save(out.parent / ARCH_FILE)
    if glca:
        _save_atomically(glca, out.parent / GLCA_FILE)
    _save_atomically(weights, out)
    return out


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``path`` whole or not at all, readable as the umask allows (safetensors alone writes 0600: a
    colleague on a shared cluster could not read the model)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~current_umask())
        tmp.replace(path)
    except Exception as error:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not write {path} ({type(error).__name__}: {error}); free disk space or write "
                      "elsewhere (trivit export CHECKPOINT --out FILE), the checkpoints are intact") from None


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
