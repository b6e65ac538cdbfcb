"""The training objective's interface, and what the model's forward returns in training.

The trainer computes the per-sample label loss of the head the labels train and hands it, with
the model's outputs, to the run's :class:`Objective` (engine/objectives/factory.py builds it): the label
loss alone, a distillation objective, DCAL's uncertainty-weighted branches.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trivit.engine.backends.base import NamedGradients
from trivit.sparse.dcal import DCALOutputs
from trivit.sparse.taps import NOTHING_TAPPED, Tapped, TapRequest

ModelOutputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | DCALOutputs
"""What the model's forward returns in training: logits, a distilled DeiT's two heads' logits, or DCAL's outputs."""


class Objective:
    """The per-sample training objective: the label loss alone (``distill.loss: none``).

    The trainer weights the per-sample objective by the example level's weights; the hooks
    (``backward``, ``step``, ``zero_grad``, state) let an objective train parameters of its own.
    """

    taps = TapRequest()
    """What the objective needs the forward pass to hand back (USKD: a [CLS] output); :meth:`loss` gets it."""

    def objective(self, label_losses: torch.Tensor, logits: torch.Tensor, images: torch.Tensor,
                  targets: torch.Tensor, tapped: Tapped = NOTHING_TAPPED) -> torch.Tensor:
        return label_losses

    def model_inputs(self, ids: torch.Tensor, step: int) -> dict[str, Any]:
        """Keyword arguments of the model's forward for the micro-batch of sample ``ids`` at ``step``."""
        return {}

    def loss(self, label_losses: torch.Tensor, outputs: ModelOutputs, images: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor, tapped: Tapped = NOTHING_TAPPED) -> torch.Tensor:
        """The micro-batch's loss: the per-sample objective weighted by ``weights`` and summed."""
        return (self.objective(label_losses, split_heads(outputs)[1], images, targets, tapped) * weights).sum()

    def backward(self) -> None:
        """After the backend's backward of each micro-batch: gradients of the objective's own parameters."""

    def step(self, lr: float) -> None:
        """After the optimizer step: update the objective's own parameters at learning rate ``lr``."""

    def zero_grad(self) -> None:
        """Drop the gradients of a skipped (non-finite) step."""

    def metrics(self) -> dict[str, Any]:
        """What the objective adds to each logged step's metrics line."""
        return {}

    def observe_evaluation(self, results: dict[str, Any]) -> None:
        """After each evaluation of the trained model, with its metrics (``eval_top1``, ...)."""

    gradient_hook: Callable[[NamedGradients], None] | None = None
    """Called by the backend with the step's reduced gradients, whole on every rank (pruning's saliency)."""

    ends_with_the_epochs = True
    """False: training goes on past ``schedule.epochs`` until :meth:`finished` (or ``schedule.max_steps``)."""

    def finished(self) -> bool:
        """Whether the objective has reached its own end of training (a pruning run's latency target)."""
        return False

    def evaluate_now(self) -> bool:
        """Whether the step just taken must be evaluated, beside the schedule's evaluations."""
        return False

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (None: a checkpoint written without this objective)."""


def split_heads(outputs: ModelOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits the labels train, the logits the distillation term trains): a ``deit_*_distilled`` model in
    distilled training gives its [CLS] head and its distillation-token head (DeiT); a DCAL model's
    self-attention head trains both; any other model one head."""
    if isinstance(outputs, DCALOutputs):
        return outputs.logits, outputs.logits
    return outputs if isinstance(outputs, tuple) else (outputs, outputs)


def prediction(class_logits: torch.Tensor, distillation_logits: torch.Tensor) -> torch.Tensor:
    """What the model predicts: the mean of a distilled model's two heads, as timm's inference takes it."""
    return class_logits if class_logits is distillation_logits else (class_logits + distillation_logits) / 2
