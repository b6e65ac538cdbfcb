"""The keep-rate schedule: EViT's dense start and cosine, and the optional final dense phase, by hand."""
from __future__ import annotations

import math

import pytest

from trivit.config import ConfigError, load
from trivit.engine.config import TrainConfig
from trivit.sparse.config import SparsityConfig
from trivit.sparse.schedule import final_keep_rates, keep_rates_at


def sparsity(**schedule) -> SparsityConfig:
    return load(SparsityConfig, None, ["tokens.keep_rate=0.7", "attention.keep_rate=0.2",
                                       *(f"schedule.{k}={v}" for k, v in schedule.items())])


@pytest.mark.parametrize("epoch, expected", [
    (0.05, (1.0, 1.0)),                                                      # the dense start
    (0.35, (0.7 + 0.3 * 0.5 * (1 + math.cos(math.pi * 0.5)), 0.2 + 0.8 * 0.5)),  # half-way down the cosine
    (1.0, (0.7, 0.2)), (2.39, (0.7, 0.2)),                                   # at the targets
    (2.4, (1.0, 1.0)), (2.9, (1.0, 1.0)),                                    # the last 0.6 of 3 epochs: dense
])
def test_keep_rates_fall_then_return_to_dense_for_the_last_epochs(epoch, expected):
    rates = keep_rates_at(sparsity(start_epochs=0.1, span_epochs=0.5, final_dense_epochs=0.6), epoch, 3.0)
    assert rates == pytest.approx(expected, abs=1e-12)


def test_without_a_final_phase_the_targets_hold_to_the_end():
    assert keep_rates_at(sparsity(start_epochs=0.1, span_epochs=0.5), 2.99, 3.0) == (0.7, 0.2)


def test_a_final_dense_phase_as_long_as_the_run_is_refused():
    with pytest.raises(ConfigError, match="final_dense_epochs.*schedule.epochs=2"):
        load(TrainConfig, None, ["schedule.epochs=2", "schedule.warmup_epochs=0",
                                 "sparsity.schedule.final_dense_epochs=2"])


def test_a_run_is_evaluated_at_the_rates_it_ends_on():
    assert final_keep_rates(sparsity(start_epochs=0.1, span_epochs=0.5)) == (0.7, 0.2)
    assert final_keep_rates(sparsity(start_epochs=0.1, span_epochs=0.5, final_dense_epochs=0.6)) == (1.0, 1.0)
