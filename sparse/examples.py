"""Example level: train on the informative samples, scored online from the training step itself.

Statistics live in tensors indexed by the global sample id and are updated with vectorised
scatters from each step's own outputs (logits against the original labels, the last block's
[CLS] attention, the per-sample loss): no extra forward pass, no loop over samples, no host
sync. Decisions are taken at epoch boundaries on statistics summed across ranks, so every rank
holds the same active set. Two policies:

- ``forgetting`` (Tri-Level E-ViT): a random ``initial_remove_fraction`` starts in a removed
  pool; every ``refresh_every_epochs`` (at most ``max_refreshes`` times) the
  ``remove_fraction`` least-forgotten active samples (ties: flattest [CLS] attention) go to the
  pool and as many random pool samples come back; the statistics window restarts.
- ``infobatch`` (Qin et al., ICLR 2024): each epoch a random ``prune_ratio`` of the samples whose
  latest loss is below the mean is skipped; the other below-mean samples get loss weight
  1 / (1 - prune_ratio), which keeps the expected gradient unbiased. No pruning in the last
  (1 - delta) of training.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from trivit.config import check

AllReduce = Callable[[torch.Tensor], None]
"""Sums a tensor in place across ranks (the engine's ``sum_across_ranks``); identity in one process."""


@dataclass(kw_only=True)
class ExampleConfig:
    """Example-level sparsity; ``policy: none`` trains on every sample."""

    policy: Literal["none", "forgetting", "infobatch"] = "none"
    initial_remove_fraction: float = 0.2
    """forgetting: fraction of the training set moved to the pool at the start."""
    remove_fraction: float = 0.05
    """forgetting: fraction of the training set exchanged with the pool at each refresh."""
    refresh_every_epochs: int = 30
    """forgetting: epochs between refreshes."""
    max_refreshes: int = 5
    """forgetting: refreshes before the active set is frozen."""
    prune_ratio: float = 0.5
    """infobatch: fraction of the below-mean-loss samples skipped each epoch."""
    delta: float = 0.875
    """infobatch: pruning stops after this fraction of the epochs."""

    def __post_init__(self) -> None:
        check(0 <= self.initial_remove_fraction < 1, "initial_remove_fraction", self.initial_remove_fraction,
              "a fraction in [0, 1)")
        check(0 <= self.remove_fraction < 1, "remove_fraction", self.remove_fraction, "a fraction in [0, 1)")
        check(self.refresh_every_epochs > 0, "refresh_every_epochs", self.refresh_every_epochs, "a positive integer")
        check(self.max_refreshes >= 0, "max_refreshes", self.max_refreshes, "an integer >= 0")
        check(0 <= self.prune_ratio < 1, "prune_ratio", self.prune_ratio, "a fraction in [0, 1)")
        check(0 < self.delta <= 1, "delta", self.delta, "a fraction in (0, 1]")


class ExampleStats:
    """Per-sample statistics, as tensors indexed by sample id.

    Each rank updates the tables from its own steps; :meth:`synchronize` (at every epoch
    boundary) merges what all ranks saw since the last synchronisation, after which the
    tables are identical on every rank.
    """

    COUNTS = ("presentations", "correct", "forgetting")
    LATEST = ("last_correct", "attention_variance", "loss")

    def __init__(self, num_samples: int, device: torch.device | str = "cpu"):
        self.num_samples = num_samples
        zeros = lambda dtype: torch.zeros(num_samples, dtype=dtype, device=device)  # noqa: E731
        self.presentations = zeros(torch.int32)
        """Presentations in the current window."""
        self.correct = zeros(torch.int32)
        """Presentations classified correctly in the window."""
        self.forgetting = zeros(torch.int32)
        """Correct -> wrong transitions between consecutive presentations in the window."""
        self.last_correct = zeros(torch.int32)
        """1 if the latest presentation was classified correctly."""
        self.attention_variance = zeros(torch.float32)
        """Variance of the last block's head-averaged [CLS] -> patch attention at the latest presentation."""
        self.loss = zeros(torch.float32)
        """Latest per-sample training loss."""
        self.seen = zeros(torch.bool)
        """Presented at least once, ever."""
        self.touched = zeros(torch.bool)
        """Presented on this rank since the last synchronisation."""
        self.synced_counts = {name: zeros(torch.int32) for name in self.COUNTS}
        """The count tables as of the last synchronisation."""

    @torch.no_grad()
    def update(self, ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
               cls_attention: torch.Tensor | None, losses: torch.Tensor) -> None:
        """Record one training step: ``labels`` are the original ones (before mixup/cutmix)."""
        ids = ids.to(self.presentations.device, non_blocking=True)
        correct = (logits.argmax(dim=-1) == labels).int()
        previously = self.last_correct[ids] * (self.presentations[ids] > 0)
        self.forgetting.index_add_(0, ids, previously * (1 - correct))
        self.correct.index_add_(0, ids, correct)
        self.presentations.index_add_(0, ids, torch.ones_like(correct))
        self.last_correct[ids] = correct
        self.seen[ids] = True
        self.touched[ids] = True
        self.loss[ids] = losses.detach().float()
        if cls_attention is not None:
            self.attention_variance[ids] = cls_attention.detach().float().var(dim=-1)

    @torch.no_grad()
    def synchronize(self, all_reduce: AllReduce) -> None:
        """Merge every rank's updates since the last call: counts add up; latest values are
        averaged over the ranks that saw the sample (kept where none did)."""
        for name in self.COUNTS:
            table, synced = getattr(self, name), self.synced_counts[name]
            delta = table - synced
            all_reduce(delta)
            table.copy_(synced + delta)
            synced.copy_(table)
        touched = self.touched.float()
        all_reduce(touched)
        for name in self.LATEST:
            table = getattr(self, name)
            summed = table.float() * self.touched
            all_reduce(summed)
            merged = torch.where(touched > 0, summed / touched.clamp(min=1), table.float())
            table.copy_(merged.round() if name == "last_correct" else merged)
        self.seen |= touched > 0
        self.touched.zero_()

    def restart_window(self) -> None:
        """Zero the window's counts (identically on every rank, right after a synchronisation)."""
        for name in self.COUNTS + ("last_correct",):
            getattr(self, name).zero_()
        for synced in self.synced_counts.values():
            synced.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = self.COUNTS + self.LATEST + ("seen", "touched")
        state = {name: getattr(self, name).cpu() for name in names}
        state.update({f"synced_{name}": table.cpu() for name, table in self.synced_counts.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.COUNTS + self.LATEST + ("seen", "touched"):
            getattr(self, name).copy_(state[name])
        for name, table in self.synced_counts.items():
            table.copy_(state[f"synced_{name}"])


def forgetting_scores(stats: ExampleStats, window_epochs: int) -> torch.Tensor:
    """Forgetting events per sample; never correct in the window counts as ``window_epochs`` (maximally forgotten)."""
    never_correct = (stats.correct == 0).to(torch.int32)
    return stats.forgetting * (1 - never_correct) + window_epochs * never_correct


def least_forgotten(active_ids: torch.Tensor, scores: torch.Tensor, attention_variance: torch.Tensor,
                    count: int) -> torch.Tensor:
    """The ``count`` active ids with the fewest forgetting events, ties broken by lowest attention variance."""
    by_variance = attention_variance[active_ids].sort(stable=True).indices
    candidates = active_ids[by_variance]
    by_score = scores[candidates].sort(stable=True).indices
    return candidates[by_score][:count]


@dataclass
class EpochPlan:
    """What the example level decided for one epoch."""

    active: torch.Tensor
    """Boolean mask over sample ids: the samples this epoch trains on."""
    weights: torch.Tensor
    """Loss weight per sample id (1 except InfoBatch's rescaled survivors)."""


class ExampleSelector:
    """Holds the active set and pool of one policy and decides them at epoch boundaries."""

    def __init__(self, config: ExampleConfig, num_samples: int, total_epochs: float, seed: int,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.num_samples = num_samples
        self.total_epochs = total_epochs
        self.stats = ExampleStats(num_samples, device)
        self.generator = torch.Generator().manual_seed(seed)
        self.in_pool = torch.zeros(num_samples, dtype=torch.bool)
        self.window_start_epoch = 0
        self.refreshes = 0
        if config.policy == "forgetting":
            removed = self._random_subset(torch.arange(num_samples), round(config.initial_remove_fraction * num_samples))
            self.in_pool[removed] = True

    def _random_subset(self, ids: torch.Tensor, count: int) -> torch.Tensor:
        return ids[torch.randperm(len(ids), generator=self.generator)[:count]]

    def plan_epoch(self, epoch: int, all_reduce: AllReduce) -> EpochPlan:
        """Decide the active set (and loss weights) of ``epoch``; call once per epoch, in order, on every rank."""
        self.stats.synchronize(all_reduce)
        policy = self.config.policy
        weights = torch.ones(self.num_samples)
        if policy == "forgetting" and self._refresh_due(epoch):
            self._refresh(epoch)
        active = ~self.in_pool
        if policy == "infobatch" and epoch < self.config.delta * self.total_epochs:
            active, weights = self._infobatch(active)
        return EpochPlan(active=active, weights=weights)

    def _refresh_due(self, epoch: int) -> bool:
        every = self.config.refresh_every_epochs
        return epoch > 0 and epoch % every == 0 and self.refreshes < self.config.max_refreshes

    def _refresh(self, epoch: int) -> None:
        stats = self.stats
        scores = forgetting_scores(stats, epoch - self.window_start_epoch).cpu()
        active_ids = (~self.in_pool).nonzero().squeeze(1)
        pool_ids = self.in_pool.nonzero().squeeze(1)
        count = min(round(self.config.remove_fraction * self.num_samples), len(pool_ids), len(active_ids))
        leaving = least_forgotten(active_ids, scores, stats.attention_variance.cpu(), count)
        returning = self._random_subset(pool_ids, count)
        self.in_pool[leaving] = True
        self.in_pool[returning] = False
        stats.restart_window()
        self.window_start_epoch = epoch
        self.refreshes += 1

    def _infobatch(self, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = self.config.prune_ratio
        loss = self.stats.loss.cpu()
        seen = self.stats.seen.cpu()
        well_learned = seen & active & (loss < loss[seen & active].mean()) if seen.any() else torch.zeros_like(seen)
        candidates = well_learned.nonzero().squeeze(1)
        pruned = self._random_subset(candidates, round(ratio * len(candidates)))
        active = active.clone()
        active[pruned] = False
        weights = torch.ones(self.num_samples)
        weights[well_learned & active] = 1.0 / (1.0 - ratio)
        return active, weights

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict(), "in_pool": self.in_pool.clone(),
                "generator": self.generator.get_state(), "window_start_epoch": self.window_start_epoch,
                "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
        self.in_pool.copy_(state["in_pool"])
        self.generator.set_state(state["generator"])
        self.window_start_epoch = state["window_start_epoch"]
        self.refreshes = state["refreshes"]
