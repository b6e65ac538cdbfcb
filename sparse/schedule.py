"""Keep-rate schedule shared by the token and attention levels (EViT's warm-up)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trivit.config import check

if TYPE_CHECKING:
    from trivit.sparse.config import SparsityConfig


@dataclass(kw_only=True)
class KeepRateScheduleConfig:
    """Keep rates are 1.0 for ``start_epochs``, then follow a cosine to their targets over ``span_epochs``."""

    start_epochs: float = 10.0
    """Epochs of dense training before the rates start to fall (EViT: 10)."""
    span_epochs: float = 100.0
    """Epochs from the start to reaching the target rates (EViT: 100); 0 = jump to the targets."""
    levels: int | None = None
    """Quantise the ramp to this many keep rates below 1.0, evenly spaced, the last one the target
    (each rate holds until the cosine has passed it); null: continuous, or 4 with engine.compile,
    whose compiled model recompiles for every distinct rate."""

    def __post_init__(self) -> None:
        check(self.start_epochs >= 0, "start_epochs", self.start_epochs, "a number of epochs >= 0")
        check(self.span_epochs >= 0, "span_epochs", self.span_epochs, "a number of epochs >= 0")
        check(self.levels is None or self.levels > 0, "levels", self.levels, "a positive integer or null")


def scheduled_keep_rate(t: float, target: float, start: float, span: float, levels: int | None = None) -> float:
    """Keep rate at time ``t``: 1.0 before ``start``, cosine to ``target`` over ``span``, then ``target``.

    With ``levels``, the rate is the cosine's rounded up to the grid 1 - j (1 - target) / levels,
    j = 0..levels: at most ``levels`` distinct rates below 1.0, the target exact. Any time unit
    works; the engine uses fractional epochs.
    """
    if t < start:
        return 1.0
    if t >= start + span:
        return target
    progress = (t - start) / span
    rate = target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if levels is None or target == 1.0:
        return rate
    done = math.floor((1.0 - rate) / (1.0 - target) * levels + 1e-9)
    return 1.0 - done * (1.0 - target) / levels if done < levels else target


def keep_rates_at(sparsity: SparsityConfig, epoch: float) -> tuple[float, float]:
    """(token, attention) keep rates of ``sparsity``'s schedule at fractional ``epoch``."""
    schedule = sparsity.schedule
    return tuple(scheduled_keep_rate(epoch, target, schedule.start_epochs, schedule.span_epochs, schedule.levels)
                 for target in (sparsity.tokens.keep_rate, sparsity.attention.keep_rate))
