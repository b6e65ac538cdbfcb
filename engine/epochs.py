"""Epoch bookkeeping for a step-based loop whose epochs may differ in length.

The example level decides each epoch's active set when the epoch begins, so an epoch's
length in steps is only known then. The tracker records where every epoch started and how
long it is; the fractional epoch it derives drives the LR and keep-rate schedules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EpochTracker:
    starts: list[int] = field(default_factory=list)
    """Global step at which each begun epoch started."""
    lengths: list[int] = field(default_factory=list)
    """Steps of each begun epoch."""
    shares: list[float] = field(default_factory=list)
    """The part of a whole epoch each begun epoch is (1.0; less for a fractional last epoch)."""

    @property
    def current(self) -> int:
        """Index of the latest begun epoch (-1 before the first)."""
        return len(self.starts) - 1

    def begin(self, step: int, length: int, share: float = 1.0) -> None:
        """Epoch ``current + 1`` begins at ``step``: ``length`` steps that make ``share`` of an epoch."""
        if length <= 0:
            raise ValueError(f"epoch {len(self.starts)} would have {length} steps")
        self.starts.append(step)
        self.lengths.append(length)
        self.shares.append(share)

    def offset(self, step: int) -> int:
        """Steps of the current epoch done at ``step``."""
        return step - self.starts[-1]

    def left(self, step: int, max_steps: int | None) -> tuple[int, int]:
        """Steps ``start, stop`` of the current epoch left at ``step`` (``max_steps`` in all may end it sooner)."""
        offset, length = self.offset(step), self.lengths[-1]
        return offset, length if max_steps is None else min(length, offset + max_steps - step)

    def epoch_done(self, step: int) -> bool:
        """True before the first epoch and once the current epoch's steps are all done."""
        return not self.starts or self.offset(step) >= self.lengths[-1]

    def progress(self, step: int) -> float:
        """Fractional epoch at ``step`` (0.0 before training, 1.0 at the end of the first epoch)."""
        if not self.starts:
            return 0.0
        return self.current + self.shares[-1] * self.offset(step) / self.lengths[-1]

    def state_dict(self) -> dict[str, Any]:
        return {"starts": list(self.starts), "lengths": list(self.lengths), "shares": list(self.shares)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.starts, self.lengths = list(state["starts"]), list(state["lengths"])
        self.shares = list(state.get("shares", [1.0] * len(self.lengths)))  # checkpoints before fractional epochs
