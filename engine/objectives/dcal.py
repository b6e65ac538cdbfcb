"""DCAL's training objective: the self-attention, GLCA and PWCA losses weighted by learned uncertainty.

    loss = 1/2 sum_k (exp(-w_k) L_k + w_k)

over the branches k the model has (sparse/dcal.py), with the w_k the model's parameter
``dcal.loss_weights.log_vars``, returned by its forward. L_SA is the run's own objective on the
self-attention head (the label loss, or a distillation objective wrapped here); the GLCA and PWCA
heads learn the labels (the mixed targets under mixup/cutmix). Each term is per sample and
weighted by the example level's weights, so w_k counts once per step whatever the accumulation.
"""
from __future__ import annotations

from typing import Any

import torch

from trivit.engine.objectives.base import ModelOutputs, Objective
from trivit.engine.objectives.losses import per_sample_cross_entropy
from trivit.sparse.dcal import DCALConfig, DCALOutputs, keyed_distractors
from trivit.sparse.taps import NOTHING_TAPPED, Tapped


def uncertainty_weighted(losses: list[torch.Tensor], log_vars: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1/2 sum_k (exp(-w_k) L_k + w_k x ``weight``): ``losses`` the branches' weighted sums, ``weight`` the
    micro-batch's share of the step (the sum of its sample weights)."""
    log_vars = log_vars.float()
    return 0.5 * sum(torch.exp(-w) * loss + w * weight for loss, w in zip(losses, log_vars, strict=True))


class DualCrossAttentionObjective(Objective):
    """Wraps the run's objective (on the self-attention head) with the GLCA and PWCA losses."""

    def __init__(self, inner: Objective, config: DCALConfig, seed: int, device: torch.device):
        self.inner, self.config, self.seed, self.device = inner, config, seed, device
        self.taps = inner.taps

    def model_inputs(self, ids: torch.Tensor, step: int) -> dict[str, Any]:
        """PWCA's distractors, a function of the micro-batch's samples and the step (:func:`keyed_distractors`)."""
        inputs = self.inner.model_inputs(ids, step)
        if self.config.pwca:
            inputs["distractors"] = keyed_distractors(ids.tolist(), step, self.seed).to(self.device)
        return inputs

    def loss(self, label_losses: torch.Tensor, outputs: ModelOutputs, images: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor, tapped: Tapped = NOTHING_TAPPED) -> torch.Tensor:
        if not isinstance(outputs, DCALOutputs):
            raise TypeError("the DCAL objective needs a DCAL model's training outputs (model.dcal, in train mode)")
        losses = [self.inner.loss(label_losses, outputs.logits, images, targets, weights, tapped)]
        losses += [(per_sample_cross_entropy(logits, targets) * weights).sum()
                   for logits in (outputs.glca, outputs.pwca) if logits is not None]
        return uncertainty_weighted(losses, outputs.log_vars, weights.sum())

    def backward(self) -> None:
        self.inner.backward()

    def step(self, lr: float) -> None:
        self.inner.step(lr)

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def state_dict(self) -> dict[str, Any] | None:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.inner.load_state_dict(state)
