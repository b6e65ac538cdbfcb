"""Which samples an epoch trains on, and with what loss weight: the loop's one interface to the example level.

The loop calls a planner the same way with or without the example level: plan an epoch when it
begins, look up the step's loss weights, show it each micro-batch's outputs, synchronise it
before a checkpoint, save and restore it. :class:`FullData` trains every sample at weight 1;
:class:`ExampleLevel` runs a policy of sparse/examples.py, scored from the training step itself
(the [CLS] attention it needs is asked of the forward pass through :attr:`taps`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trivit.engine.distributed import sum_across_ranks
from trivit.sparse.examples import EpochPlan, ExampleConfig, ExampleSelector
from trivit.sparse.taps import Tapped, TapRequest


class FullData:
    """Every listed sample, every epoch, at loss weight 1."""

    taps = TapRequest()
    """What the planner needs the forward pass to hand back."""

    def __init__(self, num_ids: int, train_samples: int, device: torch.device):
        self.train_samples, self.device = train_samples, device
        self._set(EpochPlan(active=torch.ones(num_ids, dtype=torch.bool), weights=torch.ones(num_ids)))

    def _set(self, plan: EpochPlan) -> None:
        """The epoch's plan, with its loss weights also on the device (looked up there at every step)."""
        self.plan = plan
        self.device_weights = plan.weights.to(self.device)

    def plan_epoch(self, epoch: int) -> None:
        """Decide epoch ``epoch``'s samples; called once per epoch, in order, on every rank."""

    @property
    def active_samples(self) -> int:
        """Training samples of the current epoch."""
        return self.train_samples

    def loader_mask(self) -> np.ndarray | None:
        """The sample ids the epoch's loader keeps (None: all)."""
        return None

    def weights(self, device_ids: torch.Tensor) -> torch.Tensor:
        """Loss weight of each sample of a micro-batch (ids and weights on the device)."""
        return self.device_weights[device_ids]

    def observe(self, device_ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, tapped: Tapped,
                losses: torch.Tensor) -> None:
        """A micro-batch's outputs: its logits, original labels, what the forward handed back, per-sample losses."""

    def synchronize(self) -> None:
        """Merge what every rank observed (before a checkpoint: one table for all ranks, kept once)."""

    def state_dict(self) -> dict[str, Any]:
        return {"plan": {"active": self.plan.active, "weights": self.plan.weights}, "examples": None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set(EpochPlan(active=state["plan"]["active"], weights=state["plan"]["weights"]))


class ExampleLevel(FullData):
    """The example level (``sparsity.examples.policy``: forgetting or InfoBatch)."""

    def __init__(self, config: ExampleConfig, num_ids: int, train_samples: int, epochs: float, seed: int,
                 device: torch.device):
        super().__init__(num_ids, train_samples, device)
        self.selector = ExampleSelector(config, num_ids, epochs, seed, device)
        self.taps = TapRequest(cls_attention=config.policy == "forgetting")

    def plan_epoch(self, epoch: int) -> None:
        self._set(self.selector.plan_epoch(epoch, all_reduce=sum_across_ranks))

    @property
    def active_samples(self) -> int:
        return int(self.plan.active.sum())

    def loader_mask(self) -> np.ndarray:
        return self.plan.active.numpy()

    def observe(self, device_ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, tapped: Tapped,
                losses: torch.Tensor) -> None:
        self.selector.stats.update(device_ids, logits.detach(), labels, tapped.cls_attention, losses.detach())

    def synchronize(self) -> None:
        self.selector.stats.synchronize(sum_across_ranks)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "examples": self.selector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.selector.load_state_dict(state["examples"])


def build_planner(config: ExampleConfig, num_ids: int, train_samples: int, epochs: float, seed: int,
                  device: torch.device) -> FullData:
    """The run's planner: the example level's where ``config.policy`` names one."""
    if config.policy == "none":
        return FullData(num_ids, train_samples, device)
    return ExampleLevel(config, num_ids, train_samples, epochs, seed, device)
