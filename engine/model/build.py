"""The run's model: timm's ViT by name, or a pruned architecture, with its starting weights.

A pruned architecture (sparse/pruned.py) comes from ``model.arch`` (an ``arch.json``), or from
the source ``model.init_from`` names when that is a pruned run: its checkpoints record the
architecture of the weights they export (``trainer.pt``'s ``arch``), and an exported weights
file has the ``arch.json`` written beside it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from trivit.config import ConfigError
from trivit.engine.config import TrainConfig
from trivit.engine.model.artefacts import source_arch
from trivit.engine.model.pretrained import init_from
from trivit.sparse import create_vit
from trivit.sparse.dcal import add_dcal
from trivit.sparse.pruned import PrunedArch, create_pruned_vit


def model_arch(config: TrainConfig, source: str | None = None) -> PrunedArch | None:
    """The run's pruned architecture: ``model.arch``, else that of ``source`` (default ``model.init_from``)."""
    model_cfg = config.model
    arch = PrunedArch.load(model_cfg.arch) if model_cfg.arch else source_arch(source or model_cfg.init_from)
    if arch is not None and arch.base != model_cfg.name:
        raise ConfigError("model.name", f"got {model_cfg.name!r} but the pruned architecture was pruned from "
                                        f"{arch.base!r}; set model.name={arch.base} (with its model.timm_kwargs)")
    return arch


def create_model(config: TrainConfig, num_classes: int, arch: PrunedArch | None, **overrides: Any) -> nn.Module:
    """The run's model, untrained: the pruned ``arch`` when given, else timm's ``model.name``."""
    args = dict(config.model.timm_arguments(), num_classes=num_classes, **overrides)
    if arch is None:
        model = create_vit(config.model.name, config.sparsity, **args)
    else:
        model = create_pruned_vit(arch, config.sparsity, **args)
        model.arch_record = {"arch": dataclasses.asdict(arch), "timm_kwargs": args}
    if config.model.dcal.enabled:
        add_dcal(model, config.model.dcal)
    return model


def build_training_model(config: TrainConfig, num_classes: int,
                         arch: PrunedArch | None) -> tuple[nn.Module, dict[str, Any]]:
    """The model a run trains, with ``model.init_from``'s weights; returns it and what was loaded from where."""
    model_cfg = config.model
    model = create_model(config, num_classes, arch)
    if config.engine.activation_checkpointing:
        model.set_grad_checkpointing()
    record = init_from(model, model_cfg.init_from, model_cfg.name, model_cfg.timm_kwargs) if model_cfg.init_from else {}
    patch = model.patch_embed.patch_size[0]
    if model_cfg.img_size % patch:
        raise ConfigError("model.img_size", f"got {model_cfg.img_size}; allowed: a multiple of the "
                                            f"patch size ({patch}) of {model_cfg.name}")
    return model, record


ModelBuilder = Callable[[TrainConfig, int], tuple[nn.Module, dict[str, Any]]]
"""Builds a run's model for ``num_classes`` classes: (the model, what ``model.init_from`` loaded from where)."""


def build_run_model(config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """A training run's :data:`ModelBuilder`: the architecture :func:`model_arch` names, with its starting weights."""
    return build_training_model(config, num_classes, model_arch(config))


def arch_record(model: nn.Module) -> dict[str, Any] | None:
    """What ``trainer.pt`` records of a pruned model (its architecture and timm arguments; None for timm's)."""
    return getattr(model, "arch_record", None)
