"""The training objective: the label loss, plus distillation from a frozen teacher (DeiT's soft and
hard distillation, NKD) or from the student itself (USKD).

The teacher is a plain timm ViT on every rank (replicated, never sharded, never given to the
optimizer, not in the checkpoints: the config names it), in eval mode, run under no_grad on the
very images the student sees (after mixup/cutmix), in the run's precision. Each loss is per
sample, so the example level can still weight samples; the training objective is
``(1 - alpha) x label loss + alpha x distillation term``.

NKD ("From Knowledge Distillation to Self-Knowledge Distillation", ICCV 2023), with T and S the
teacher's and student's softmax, t the target class (the label; under mixup/cutmix the class of
the largest soft label), and T^, S^ the softmaxes of the non-target logits divided by lambda
(the target removed before the softmax):  -T_t log S_t - gamma lambda^2 sum_{i != t} T^_i log S^_i.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F

from trivit.config import load
from trivit.engine.config import DistillConfig, TrainConfig
from trivit.engine.model.pretrained import check_fits, find_run_config, read_weights
from trivit.engine.objectives.base import Objective
from trivit.sparse.dcal import split_branch
from trivit.sparse.taps import NOTHING_TAPPED, Tapped

log = logging.getLogger(__name__)


def soft_distillation(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Per sample, DeiT's soft term: tau^2 KL(softmax(teacher / tau) || softmax(student / tau)), averaged
    over the classes as DeiT's code does (its sum over the batch and classes, divided by their number)."""
    student_log = F.log_softmax(student.float() / tau, dim=-1)
    teacher_log = F.log_softmax(teacher.float() / tau, dim=-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)
    return kl * tau * tau / student.shape[-1]


def hard_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per sample, DeiT's hard term: cross-entropy to the teacher's top class."""
    return F.cross_entropy(student.float(), teacher.argmax(dim=-1), reduction="none")


def nkd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, gamma: float,
             lambda_: float) -> torch.Tensor:
    """Per sample, NKD's loss for target classes ``target`` (B,)."""
    student, teacher = student.float(), teacher.float()
    index = target.unsqueeze(-1)
    student_log = F.log_softmax(student, dim=-1)
    target_term = -teacher.softmax(dim=-1).gather(-1, index).squeeze(-1) * student_log.gather(-1, index).squeeze(-1)
    is_target = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, index, True)
    teacher_rest = (teacher / lambda_).masked_fill(is_target, float("-inf")).softmax(dim=-1)
    student_rest = F.log_softmax((student / lambda_).masked_fill(is_target, float("-inf")), dim=-1)
    non_target = (teacher_rest * student_rest.masked_fill(is_target, 0.0)).sum(dim=-1)
    return target_term - gamma * lambda_ ** 2 * non_target


def build_teacher(config: DistillConfig, num_classes: int) -> nn.Module:
    """The frozen teacher, dense, on the CPU (the caller moves it); its classes must be the student's."""
    source = Path(config.teacher).expanduser()
    run_config = find_run_config(source)
    if run_config is not None:
        model_cfg = load(TrainConfig, run_config).model
        name, kwargs, weights = model_cfg.name, dict(model_cfg.timm_arguments(), drop_path_rate=0.0), str(source)
    elif config.teacher_weights is None:
        raise ValueError(f"distill.teacher={config.teacher!r} is not a trivit run (no config.yaml); for a timm "
                         "model name set distill.teacher_weights (a weights file, a run, or 'timm')")
    else:
        name, kwargs, weights = config.teacher, dict(config.teacher_kwargs), config.teacher_weights
    state, described = read_weights(weights, name, kwargs)
    state = split_branch(state)[0]  # a DCAL run's branches: the teacher is the plain backbone
    head = state.get("head.weight")
    if head is None or head.shape[0] != num_classes:
        raise ValueError(f"distill.teacher: {described} classifies {None if head is None else head.shape[0]} classes, "
                         f"the student {num_classes}; a teacher must predict the same classes")
    teacher = timm.create_model(name, **dict(kwargs, num_classes=num_classes))
    check_fits(state, teacher)
    teacher.load_state_dict(state)
    log.info("distillation teacher: %s (%s, %.1fM parameters)", described, name,
             sum(p.numel() for p in teacher.parameters()) / 1e6)
    return teacher.eval().requires_grad_(False)


def check_teacher_inputs(teacher: nn.Module, img_size: int, in_chans: int) -> None:
    """The teacher runs on the student's very images: it must take their size and channels."""
    embed = teacher.patch_embed
    size, channels = tuple(embed.img_size), embed.proj.in_channels
    resizes = getattr(embed, "dynamic_img_size", False)
    if (size != (img_size, img_size) and not resizes) or channels != in_chans:
        raise ValueError(f"distill.teacher takes {size[0]}x{size[1]} images of {channels} channel(s), the student "
                         f"{img_size}x{img_size} of {in_chans}: the teacher sees the student's very images. Use a "
                         f"teacher trained at the student's size and channels, or set distill.teacher_kwargs "
                         f"(img_size: {img_size}, in_chans: {in_chans}, or dynamic_img_size: true)")


class Distiller(Objective):
    """Adds a frozen teacher's term to the per-sample label loss."""

    def __init__(self, config: DistillConfig, teacher: nn.Module, amp_dtype: torch.dtype | None):
        self.config, self.teacher, self.amp_dtype = config, teacher, amp_dtype

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        device = images.device.type
        with torch.autocast(device, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.teacher(images).float()

    def objective(self, label_losses: torch.Tensor, logits: torch.Tensor, images: torch.Tensor,
                  targets: torch.Tensor, tapped: Tapped = NOTHING_TAPPED) -> torch.Tensor:
        """Per sample: (1 - alpha) x the label loss + alpha x the distillation term."""
        config, teacher = self.config, self.teacher_logits(images)
        if config.loss == "soft":
            term = soft_distillation(logits, teacher, config.tau)
        elif config.loss == "hard":
            term = hard_distillation(logits, teacher)
        else:
            term = nkd_loss(logits, teacher, targets.argmax(dim=-1), config.gamma, config.lambda_)
        return (1 - config.alpha) * label_losses + config.alpha * term
