"""USKD ("From Knowledge Distillation to Self-Knowledge Distillation", ICCV 2023): self-distillation
without a teacher, through a weak classifier on a middle block's [CLS] output; see :class:`SelfDistiller`
and :func:`uskd_terms`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from trivit.config import ConfigError
from trivit.engine.config import OptimConfig, USKDConfig
from trivit.engine.distributed import sum_tensor
from trivit.engine.objectives.base import ModelOutputs, Objective, split_heads
from trivit.engine.objectives.losses import per_sample_cross_entropy
from trivit.engine.optim import build_optimizer
from trivit.sparse.taps import NOTHING_TAPPED, Tapped, TapRequest

log = logging.getLogger(__name__)


WEAK_SMOOTHING = 0.1
"""The weak classifier learns 0.9/0.1-smoothed labels (USKD)."""


def label_distribution(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The labels before smoothing, from the soft targets timm's Mixup (or :func:`smoothed_targets`) built as
    (1 - smoothing) y + smoothing / K: y is one-hot, or mixup's/cutmix's mix of two classes."""
    return (targets.float() - smoothing / targets.shape[-1]) / (1 - smoothing)


def uskd_ranking_scores(logits: torch.Tensor, weak_logits: torch.Tensor, is_target: torch.Tensor,
                        ranking: str) -> torch.Tensor:
    """Scores whose descending order ranks the classes for USKD's Zipf soft labels.

    'paper': W_i / (1 - W_T) + S_i / (1 - S_T), the weak classifier's (W) and the student's (S)
    probabilities normalised over the non-target classes, T the target classes; the targets rank last.
    'code': the authors' code, log S in place of S (and its 1e-6), every class ranked, targets included.
    """
    weak = weak_logits.softmax(dim=-1)
    student = logits.softmax(dim=-1) if ranking == "paper" else F.log_softmax(logits, dim=-1)
    weak_t = (weak * is_target).sum(dim=-1, keepdim=True)
    student_t = (student * is_target).sum(dim=-1, keepdim=True)
    if ranking == "code":
        return weak / (1 - weak_t + 1e-6) + student / (1 - student_t + 1e-6)
    scores = weak / (1 - weak_t).clamp_min(1e-12) + student / (1 - student_t).clamp_min(1e-12)
    return scores.masked_fill(is_target, float("-inf"))


def zipf_weights(scores: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """Zipf's law over the ranking: the class at rank k (1 = highest score) gets 1 / k, then the weights are
    renormalised over the non-target classes."""
    rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1) + 1
    weights = rank.reciprocal().masked_fill(is_target, 0.0)
    return weights / weights.sum(dim=-1, keepdim=True)


def uskd_terms(logits: torch.Tensor, weak_logits: torch.Tensor, labels: torch.Tensor,
               ranking: str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, USKD's target and non-target terms for label distributions ``labels`` (B, K).

    The target classes t are the two largest label entries with weight V_t > 0 (one class without
    mixup). Target: -sum_t p_t log S_t with p_t = stopgrad(S_t^2 + V_t - the batch mean of S_t^2),
    the mean per label column over the samples where it counts (the code's mean over the whole
    batch, for its first column; a same-class mix has no second). Non-target: -sum_{i not t} z_i
    log S~_i, S~ the softmax over the non-target logits and z the Zipf weights of
    :func:`zipf_weights` (stopgrad). ``weak_logits`` only rank.
    """
    logits = logits.float()
    values, classes = labels.topk(2, dim=-1)
    counted = values > 1e-6  # unsmoothing leaves ~1e-9 where a class has no weight
    values = values.where(counted, 0.0)
    log_probs = F.log_softmax(logits, dim=-1)
    log_s_t = log_probs.gather(-1, classes)
    with torch.no_grad():
        squared = log_s_t.exp() ** 2 * counted
        batch_mean = squared.sum(dim=0, keepdim=True) / counted.sum(dim=0, keepdim=True).clamp_min(1)
        p_t = (squared + values - batch_mean) * counted
        is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, classes, counted)
        zipf = zipf_weights(uskd_ranking_scores(logits, weak_logits.float(), is_target, ranking), is_target)
    target_term = -(p_t * log_s_t).sum(dim=-1)
    rest = F.log_softmax(logits.masked_fill(is_target, float("-inf")), dim=-1).masked_fill(is_target, 0.0)
    return target_term, -(zipf * rest).sum(dim=-1)


def weak_block(depth: int) -> int:
    """The block whose [CLS] output USKD's weak classifier reads: int(0.5 x depth) - 1."""
    return int(0.5 * depth) - 1


class SelfDistiller(Objective):
    """USKD: label loss + alpha x target term + beta x non-target term + mu x the weak classifier's loss.

    The weak classifier is a linear layer on the [CLS] output of block :func:`weak_block` (before
    the final norm), trained with the model but outside it: the model's state_dict stays timm's,
    and trivit's checkpoints keep the classifier and its optimizer. Its cross-entropy reaches the
    backbone through the model's backward; its own gradient comes from a second, unscaled backward
    of the same loss on detached features (so fp16 loss scaling never touches it), is averaged
    over the ranks by hand (no backend wraps it), clipped like the model's, and stepped by an AdamW
    of the run's settings at the learning rate of the model's unscaled groups.
    """

    def __init__(self, config: USKDConfig, model: nn.Module, num_classes: int, smoothing: float, optim: OptimConfig,
                 global_batch: int, device: torch.device):
        depth = len(model.blocks)
        if weak_block(depth) < 0:
            raise ValueError(f"distill.loss=uskd reads the [CLS] output of block int(0.5 x depth) - 1, but the model "
                             f"has {depth} block(s); use a model with at least 2 blocks")
        semantic = model.blocks.semantic
        if semantic is not None and semantic.prefix_after(weak_block(depth)) == 0:
            raise ConfigError("distill.loss", f"got 'uskd', whose weak classifier reads the [CLS] output of block "
                                              f"{weak_block(depth)}, which semantic tokens with head 'gap' drop; set "
                                              "sparsity.semantic.head=cls")
        self.config, self.num_classes, self.smoothing, self.clip = config, num_classes, smoothing, optim.clip_grad
        self.taps = TapRequest(cls_at=weak_block(depth))
        self.head = nn.Linear(model.embed_dim, num_classes, device=device)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # timm's ViT head init
        nn.init.zeros_(self.head.bias)
        self.optimizer = build_optimizer(self.head, dataclasses.replace(optim, layer_decay=None), global_batch)
        self.pending: torch.Tensor | None = None
        log.info("USKD: weak classifier on the [CLS] output of block %d of %d, ranking=%s",
                 weak_block(depth), depth, config.ranking)

    def _weak_targets(self, labels: torch.Tensor) -> torch.Tensor:
        return (1 - WEAK_SMOOTHING) * labels + WEAK_SMOOTHING / self.num_classes

    def _terms(self, logits: torch.Tensor, targets: torch.Tensor, tapped: Tapped) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: USKD's weighted terms for the model (the weak classifier's weights detached), and
        the weak classifier's own cross-entropy (the features detached)."""
        if tapped.cls_output is None:
            raise ValueError("USKD needs the forward's [CLS] output of block weak_block(depth): call the model with "
                             "taps=objective.taps and pass what it hands back as tapped")
        features = tapped.cls_output.float()
        labels = label_distribution(targets, self.smoothing)
        weak_targets = self._weak_targets(labels)
        weak_logits = F.linear(features, self.head.weight.detach(), self.head.bias.detach())
        target_term, non_target_term = uskd_terms(logits, weak_logits.detach(), labels, self.config.ranking)
        weak_loss = per_sample_cross_entropy(weak_logits, weak_targets)
        config = self.config
        terms = config.alpha * target_term + config.beta * non_target_term + config.mu * weak_loss
        return terms, per_sample_cross_entropy(self.head(features.detach()), weak_targets)

    def objective(self, label_losses: torch.Tensor, logits: torch.Tensor, images: torch.Tensor,
                  targets: torch.Tensor, tapped: Tapped = NOTHING_TAPPED) -> torch.Tensor:
        return label_losses + self._terms(logits, targets, tapped)[0]

    def loss(self, label_losses: torch.Tensor, outputs: ModelOutputs, images: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor, tapped: Tapped = NOTHING_TAPPED) -> torch.Tensor:
        """The model's loss; the weak classifier's own weighted loss waits for :meth:`backward`."""
        terms, own = self._terms(split_heads(outputs)[1], targets, tapped)
        self.pending = self.config.mu * (own * weights).sum()
        return ((label_losses + terms) * weights).sum()

    def backward(self) -> None:
        self.pending.backward()
        self.pending = None

    def step(self, lr: float) -> None:
        grads = [p.grad for p in self.head.parameters()]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            flat = sum_tensor(torch.cat([g.reshape(-1) for g in grads])) / torch.distributed.get_world_size()
            for grad, reduced in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(reduced.view_as(grad))
        if self.clip is not None:
            nn.utils.clip_grad_norm_(self.head.parameters(), self.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = None

    def state_dict(self) -> dict[str, Any]:
        return {"weak_classifier": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            log.info("distill.loss=uskd is new in this run: its weak classifier starts from scratch")
            return
        self.head.load_state_dict(state["weak_classifier"])
        self.optimizer.load_state_dict(state["optimizer"])
