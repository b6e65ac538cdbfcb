"""AdamW and the warm-up + cosine learning-rate schedule, from timm."""
from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from trivit.engine.config import OptimConfig, ScheduleConfig


def build_optimizer(model: nn.Module, optim: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases, norms and the model's ``no_weight_decay`` parameters; with
    ``optim.layer_decay``, one group per layer whose ``lr_scale`` timm's scheduler applies."""
    return create_optimizer_v2(model, "adamw", lr=optim.peak_lr(global_batch), weight_decay=optim.weight_decay,
                               betas=tuple(optim.betas), eps=optim.eps, layer_decay=optim.layer_decay)


def peak_group_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the groups at full scale (the schedule's value; lower layers get less)."""
    return max(group["lr"] for group in optimizer.param_groups)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig) -> CosineLRScheduler:
    """Linear warm-up over ``warmup_epochs``, then cosine to ``min_lr`` at ``epochs``.

    Stepped with the fractional epoch after every update, so the schedule follows training
    progress however many steps an epoch has (the example level shortens epochs).
    """
    return CosineLRScheduler(optimizer, t_initial=schedule.epochs - schedule.warmup_epochs, lr_min=schedule.min_lr,
                             warmup_t=schedule.warmup_epochs, warmup_lr_init=schedule.warmup_lr,
                             warmup_prefix=True, t_in_epochs=True)
