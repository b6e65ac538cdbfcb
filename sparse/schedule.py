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
    """Keep rates are 1.0 for ``start_epochs``, then follow a cosine to their targets over ``span_epochs``, and
    return to 1.0 for the run's last ``final_dense_epochs``."""

    start_epochs: float = 10.0
    """Epochs of dense training before the rates start to fall (EViT: 10)."""
    span_epochs: float = 100.0
    """Epochs from the start to reaching the target rates (EViT: 100); 0 = jump to the targets."""
    final_dense_epochs: float = 0.0
    """The run's last epochs at keep rate 1.0, so that the final model is tuned on every token and link (as
    random-LTD ends on the full sequence); 0: none (the paper's schedule)."""
    levels: int | None = None
    """Quantise the ramp to this many keep rates below 1.0, evenly spaced, the last one the target
    (each rate holds until the cosine has passed it); null: continuous, or 4 with engine.compile,
    whose compiled model recompiles for every distinct rate."""

    def __post_init__(self) -> None:
        check(self.start_epochs >= 0, "start_epochs", self.start_epochs, "a number of epochs >= 0")
        check(self.span_epochs >= 0, "span_epochs", self.span_epochs, "a number of epochs >= 0")
        check(self.levels is None or self.levels > 0, "levels", self.levels, "a positive integer or null")
        check(self.final_dense_epochs >= 0, "final_dense_epochs", self.final_dense_epochs, "a number of epochs >= 0")


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


def keep_rates_at(sparsity: SparsityConfig, epoch: float, total_epochs: float) -> tuple[float, float]:
    """(token, attention) keep rates of ``sparsity``'s schedule at fractional ``epoch`` of ``total_epochs``."""
    schedule = sparsity.schedule
    if schedule.final_dense_epochs and epoch >= total_epochs - schedule.final_dense_epochs:
        return 1.0, 1.0
    return tuple(scheduled_keep_rate(epoch, target, schedule.start_epochs, schedule.span_epochs, schedule.levels)
                 for target in (sparsity.tokens.keep_rate, sparsity.attention.keep_rate))


def final_keep_rates(sparsity: SparsityConfig) -> tuple[float, float]:
    """(token, attention) keep rates a run ends on, which its evaluations use: the targets, or 1.0 after a final
    dense phase."""
    if sparsity.schedule.final_dense_epochs:
        return 1.0, 1.0
    return sparsity.tokens.keep_rate, sparsity.attention.keep_rate
