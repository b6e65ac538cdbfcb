"""The run's objective, from ``distill.loss`` and ``model.dcal`` (engine/objectives/)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from trivit.config import ConfigError
from trivit.engine.config import TEACHER_LOSSES, TrainConfig
from trivit.engine.objectives.base import Objective
from trivit.engine.objectives.dcal import DualCrossAttentionObjective
from trivit.engine.objectives.distill import Distiller, build_teacher, check_teacher_inputs
from trivit.engine.objectives.uskd import SelfDistiller

log = logging.getLogger(__name__)


def build_objective(config: TrainConfig, model: nn.Module, num_classes: int, device: torch.device,
                    amp_dtype: torch.dtype | None) -> Objective:
    """The run's objective (``distill.loss``, and DCAL's branches around it); call it with the initial seed
    set (every rank the same).

    A ``deit_*_distilled`` student distils through its distillation token's head (DeiT); without a
    teacher it trains as timm fine-tunes it, the mean of both heads against the labels."""
    objective = _distillation_objective(config, model, num_classes, device, amp_dtype)
    if config.model.dcal.enabled:
        return DualCrossAttentionObjective(objective, config.model.dcal, config.seed, device)
    return objective


def _distillation_objective(config: TrainConfig, model: nn.Module, num_classes: int, device: torch.device,
                            amp_dtype: torch.dtype | None) -> Objective:
    distill = config.distill
    distilled = hasattr(model, "set_distilled_training")
    if distill.loss in TEACHER_LOSSES:
        if distilled:
            model.set_distilled_training(True)
        teacher = build_teacher(distill, num_classes)
        check_teacher_inputs(teacher, config.model.img_size, config.model.in_chans)
        return Distiller(distill, teacher.to(device), amp_dtype)
    if distill.loss == "uskd":
        if distilled:
            raise ConfigError("distill.loss", f"got 'uskd' with {config.model.name}, whose distillation token needs a "
                                              "teacher; use a model without one (deit_*_patch16_224) or a teacher loss")
        return SelfDistiller(distill.uskd, model, num_classes, config.data.label_smoothing, config.optim,
                             config.data.batch_size, device)
    return Objective()
