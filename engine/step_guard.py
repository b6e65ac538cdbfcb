"""The decisions every rank takes together at each micro-batch: skip or stop on a non-finite loss,
stop on SIGTERM, stop on too much bad data.

One all-reduce per micro-batch carries [loss, stop requested, seen, skipped, bad shards], summed
over ranks, so every rank sees the same numbers and decides the same thing at the same step.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trivit.engine.config import TrainConfig
from trivit.engine.distributed import sum_tensor

log = logging.getLogger(__name__)


class StepGuard:
    def __init__(self, config: TrainConfig, train_samples: int, world_size: int, device: torch.device,
                 saved_checkpoints: Callable[[], list[tuple[int, Path]]]):
        self.config, self.train_samples, self.world_size, self.device = config, train_samples, world_size, device
        self.saved_checkpoints = saved_checkpoints
        self.stop_requested = False
        """SIGTERM seen by this rank; ``preempted`` once every rank knows (the step's all-reduce)."""
        self.preempted = False
        self.nonfinite_steps = 0
        self.data_counts = {"seen": 0, "skipped": 0, "bad_shards": 0}
        """Training samples read, unreadable samples skipped, unreadable shards (cumulative, all ranks)."""

    def share(self, loss: torch.Tensor, batch_counts: tuple[int, int, int] | None) -> torch.Tensor:
        """The micro-batch's loss averaged over ranks, after the all-reduce that also carries the stop
        requests and (for a step's first micro-batch) its ``(seen, skipped, bad shards)`` counts."""
        local = torch.tensor([0.0, float(self.stop_requested), *(batch_counts or (0, 0, 0))], dtype=torch.float64,
                             device=self.device)
        local[0] = loss.detach().double()
        shared = sum_tensor(local)
        if batch_counts is not None:
            self._count_data(shared[2:])
        self.preempted = self.preempted or shared[1].item() > 0
        return shared[0] / self.world_size

    def _count_data(self, counts: torch.Tensor) -> None:
        """Add a step's sample and bad-data counts (summed over ranks); too much bad data stops training."""
        seen, skipped, bad_shards = (int(c) for c in counts.tolist())
        total = self.data_counts
        total["seen"] += seen
        total["skipped"] += skipped
        total["bad_shards"] += bad_shards
        read = total["seen"] + total["skipped"]
        limit = self.config.data.max_bad_fraction
        if read >= min(1000, self.train_samples) and total["skipped"] > limit * read:
            raise ValueError(f"{total['skipped']} of the {read} training samples read so far are unreadable, more "
                             f"than data.max_bad_fraction={limit}; the warnings above name their shards and keys. "
                             "Repair the shards (trivit shards checks every image) or raise data.max_bad_fraction")

    def nonfinite(self, loss: torch.Tensor, step: int) -> None:
        """Stop on a NaN/inf loss at ``step``, or skip the update and count it (``engine.nonfinite_loss``)."""
        engine = self.config.engine
        saved = self.saved_checkpoints()
        kept = f"the last checkpoint {saved[-1][1]} is intact" if saved else "no checkpoint was written yet"
        where = f"loss is {loss.item()} (mean over all ranks) at step {step}; {kept}"
        if engine.nonfinite_loss == "stop":
            raise FloatingPointError(f"{where} (engine.nonfinite_loss=skip skips such steps instead)")
        self.nonfinite_steps += 1
        log.warning("%s; update skipped (%d so far)", where, self.nonfinite_steps)
        if self.nonfinite_steps > engine.max_nonfinite_steps:
            raise FloatingPointError(f"{where}; {self.nonfinite_steps} steps had non-finite losses, more than "
                                     f"engine.max_nonfinite_steps={engine.max_nonfinite_steps}: lower the learning "
                                     "rate or check the data")

    def state_dict(self) -> dict[str, Any]:
        return {"data_counts": dict(self.data_counts), "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data_counts = dict(state["data_counts"])
        self.nonfinite_steps = state["nonfinite_steps"]
