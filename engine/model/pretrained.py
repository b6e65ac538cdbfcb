"""Start a run from existing weights (``model.init_from``), adapted to the run's model as timm adapts them.

A start is not a resume: the run keeps its own step 0, schedules and checkpoints, and only the
model's weights come from the source. Sources: a timm-format weights file (``.safetensors``,
``.pth``/``.pt``/``.bin``, bare or wrapped in ``state_dict``/``model``), a trivit run_dir or
checkpoint folder (any backend's format, consolidated), or ``timm``: timm's pretrained weights
for ``model.name`` from the local cache (or ``pretrained_cfg_overlay``'s file).

Differences timm users expect to be bridged are bridged with timm's own helpers: another patch
grid or image size resamples the position embedding (and patch size the patch embedding:
``checkpoint_filter_fn``), another ``in_chans`` adapts the patch embedding
(``adapt_input_conv``), another number of classes re-initialises the head. Any other difference
is an error naming the first differing key and both shapes.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import get_pretrained_cfg, load_state_dict
from timm.models._manipulate import adapt_input_conv
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from trivit.engine.model.artefacts import GLCA_FILE, find_checkpoint
from trivit.engine.model.export import consolidated_weights
from trivit.sparse.dcal import GLCA_PREFIX, entries_under, split_branch

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
"""The classifier (and a distilled DeiT's second one), re-initialised when the classes differ."""
PATCH_KEY = "patch_embed.proj.weight"
ADDED_KEYS = ("global_centres",)
"""Parameters trivit adds to timm's ViT (semantic tokens): a timm checkpoint lacks them; they keep their initialisation."""


def find_run_config(path: Path) -> Path | None:
    """The config.yaml of the trivit run ``path`` belongs to: a run_dir, a checkpoint folder in its
    checkpoints/, or a file in the run_dir (its model.safetensors); None when there is none."""
    folders = (path, path.parent.parent) if path.is_dir() else (path.parent,)
    return next((folder / "config.yaml" for folder in folders if (folder / "config.yaml").is_file()), None)


def read_weights(source: str, model_name: str, timm_kwargs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict named by ``source`` and a description of where it came from."""
    if source == "timm":
        path = timm_weights_file(model_name, timm_kwargs)
        return load_state_dict(str(path), use_ema=False), f"timm's pretrained {model_name} ({path})"
    path = Path(source).expanduser()
    if path.is_dir() or path.name == "trainer.pt":
        checkpoint = find_checkpoint(path)
        return consolidated_weights(checkpoint), f"trivit checkpoint {checkpoint}"
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: no such file or folder {source!r}; give a weights file "
                                f"({', '.join(WEIGHT_SUFFIXES)}), a trivit run_dir or checkpoint folder, or 'timm'")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"model.init_from: {source!r} is not a weights file this reads ({', '.join(WEIGHT_SUFFIXES)})")
    state = read_weights_file(path)
    beside = path.parent / GLCA_FILE
    if beside.is_file() and beside != path:  # a DCAL model's GLCA branch, exported beside its backbone
        state.update({GLCA_PREFIX + key: value for key, value in read_weights_file(beside).items()})
    return state, f"weights file {path}"


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """timm's reading of a weights file, with one line naming the file when it is not what its name says."""
    try:
        state = load_state_dict(str(path), use_ema=False)
    except Exception as error:  # noqa: BLE001 - pickle, safetensors and zip each raise their own
        with path.open("rb") as file:
            safetensors = file.read(9)[8:9] == b"{"  # an 8-byte header length, then its JSON
        hint = ("; its bytes are safetensors: name it *.safetensors" if safetensors and path.suffix != ".safetensors"
                else "")
        raise ValueError(f"model.init_from: {path} cannot be read as weights ({type(error).__name__}: "
                         f"{str(error)[:160]}){hint}; give a timm-format weights file, a trivit run_dir or 'timm'"
                         ) from None
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"model.init_from: {path} holds no state dict of tensors; give a timm-format weights file")
    return state


def timm_weights_file(model_name: str, timm_kwargs: Mapping[str, Any]) -> Path:
    """The local file of timm's pretrained weights for ``model_name`` (never downloads)."""
    overlay = timm_kwargs.get("pretrained_cfg_overlay") or {}
    if overlay.get("file"):
        return Path(overlay["file"]).expanduser()
    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        raise ValueError(f"model.init_from=timm: timm has no pretrained weights for {model_name!r}; name a tagged "
                         f"model (timm.list_pretrained('{model_name.split('.')[0]}*')) or give a weights file")
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if cached.is_file():
            return cached
    where = f"the Hugging Face hub ({cfg.hf_hub_id})" if cfg.hf_hub_id else f"{cfg.url}"
    raise FileNotFoundError(f"model.init_from=timm: timm's pretrained weights for {model_name!r} are not in the local "
                            f"cache and trivit does not download; fetch them from {where} where there is network "
                            f"(timm.create_model('{model_name}', pretrained=True) fills the cache), or give the file as "
                            "model.init_from=PATH or model.timm_kwargs.pretrained_cfg_overlay={file: PATH}")


def adapt_weights(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` fitted to ``model`` as timm fits pretrained weights; returns it and what was changed."""
    notes = []
    target = model.state_dict()
    if PATCH_KEY in state and state[PATCH_KEY].ndim == 4 and state[PATCH_KEY].shape[1] != target[PATCH_KEY].shape[1]:
        channels = target[PATCH_KEY].shape[1]
        notes.append(f"adapted the patch embedding from {state[PATCH_KEY].shape[1]} to {channels} input channels")
        state = {**state, PATCH_KEY: adapt_input_conv(channels, state[PATCH_KEY])}
    original = {key: tuple(value.shape) for key, value in state.items()}
    state = checkpoint_filter_fn(state, model)
    for key in ("pos_embed", PATCH_KEY):
        if key in state and key in original and tuple(state[key].shape) != original[key]:
            notes.append(f"resampled {key} from {list(original[key])} to {list(state[key].shape)}")
    head = state.get("head.weight")
    if head is not None and head.shape != target["head.weight"].shape:
        notes.append(f"re-initialised the head: {head.shape[0]} classes in the source, {target['head.weight'].shape[0]} "
                     "here")
        state = {key: value for key, value in state.items() if key not in HEAD_KEYS}
    return state, notes


def check_fits(state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Every key of ``model``'s backbone but a re-initialised head is in ``state`` with its shape, and nothing
    else is (DCAL's branches are not the backbone's: :func:`load_dcal_branch`)."""
    target = split_branch(model.state_dict())[0]
    for key, value in target.items():
        if key in HEAD_KEYS + ADDED_KEYS and key not in state:
            continue
        if key not in state:
            raise ValueError(f"model.init_from: the weights have no {key!r} (shape {list(value.shape)} here); they are "
                             "not this architecture (model.name, model.timm_kwargs)")
        if state[key].shape != value.shape:
            narrower = state[key].dim() == value.dim() and all(a <= b for a, b in zip(state[key].shape, value.shape))
            pruned = (" They look pruned (narrower than the model here): a pruned model is read with its arch.json, "
                      "which trivit export writes beside the weights; keep it beside them or name it with "
                      "model.arch=PATH." if narrower and ".blocks." in f".{key}" else "")
            raise ValueError(f"model.init_from: {key!r} has shape {list(state[key].shape)} in the weights but "
                             f"{list(value.shape)} here; the weights are not this architecture (model.name, "
                             f"model.timm_kwargs).{pruned}")
    extra = [key for key in state if key not in target]
    if "global_centres" in extra:
        raise ValueError("model.init_from: the weights are of a semantic-token model (they hold 'global_centres'), "
                         "this model has none: give the source run's sparsity.semantic settings (or its config.yaml "
                         "as --config)")
    if extra:
        raise ValueError(f"model.init_from: the weights hold {extra[0]!r} (shape {list(state[extra[0]].shape)}), which "
                         f"this model has not; they are not this architecture (model.name, model.timm_kwargs)")


def load_adapted(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` into ``model``, adapted and checked; returns what was adapted."""
    state, branch = split_branch(state)
    state, notes = adapt_weights(state, model)
    check_fits(state, model)
    added = [key for key in ADDED_KEYS if key in model.state_dict() and key not in state]
    notes += [f"{key} is not in the weights (trivit adds it): it keeps its initialisation" for key in added]
    reinitialised_head = "head.weight" not in state
    dcal = getattr(model, "dcal", None)
    model.load_state_dict(state, strict=not (reinitialised_head or added or dcal))  # check_fits checked the rest
    if dcal is not None:
        notes += load_dcal_branch(model, branch)
    elif branch:
        notes.append("the weights' DCAL branches are not used: model.dcal is off here")
    return notes


def load_dcal_branch(model: nn.Module, branch: Mapping[str, torch.Tensor]) -> list[str]:
    """DCAL's entries of the weights (``dcal.`` stripped) into ``model.dcal`` where they fit; a GLCA branch
    that is not in them, or does not fit, starts as a copy of the loaded last block, norm and head."""
    dcal, notes = model.dcal, []
    if dcal.glca is not None:
        glca = entries_under(branch, "glca.")
        if _same_shapes(glca, dcal.glca.state_dict()):
            dcal.glca.load_state_dict(glca)
            notes.append("loaded the GLCA branch from the weights")
        else:
            dcal.glca.copy_from(model)
            why = "the weights' does not fit this model" if glca else "the weights have none"
            notes.append(f"the GLCA branch starts as a copy of the last block, norm and head ({why})")
    weights = entries_under(branch, "loss_weights.")
    if _same_shapes(weights, dcal.loss_weights.state_dict()):
        dcal.loss_weights.load_state_dict(weights)
        notes.append("loaded DCAL's uncertainty weights from the weights")
    return notes


def _same_shapes(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> bool:
    return state.keys() == target.keys() and all(state[key].shape == target[key].shape for key in target)


def init_from(model: nn.Module, source: str, model_name: str, timm_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Load ``source`` into ``model`` (adapted); returns what was loaded from where, for the run's log."""
    state, described = read_weights(source, model_name, timm_kwargs)
    notes = load_adapted(model, state)
    for line in [f"initial weights from {described}", *notes]:
        log.info("model.init_from: %s", line)
    return {"init_from": described, "init_changes": notes}

