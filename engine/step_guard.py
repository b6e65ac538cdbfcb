"""The decisions every rank takes together at each step: skip or stop on a non-finite loss, stop on
SIGTERM, stop on too much bad data.

One all-reduce per micro-batch carries [loss, stop requested, seen, skipped, bad shards], summed
over ranks, so every rank sees the same numbers and decides the same thing at the same step.

Reading those numbers on the host makes the CPU wait for the GPU. So with ``engine.nonfinite_loss:
stop`` (the default) a step's numbers are copied to the host without waiting and read one step
later, once the next step's work is queued: the GPU is never left idle while the host decides. A
stop (non-finite loss, SIGTERM, bad data) then acts one step late, which loses nothing: before a
checkpoint, a log line or an evaluation the trainer calls :meth:`StepGuard.settle`, which reads
every step so far. ``skip`` must decide before the update, so it reads each micro-batch's loss at
once (one wait per micro-batch).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from trivit.engine.config import TrainConfig
from trivit.engine.distributed import sum_tensor

log = logging.getLogger(__name__)


class _Pending(NamedTuple):
    step: int
    values: torch.Tensor
    """[loss summed over ranks and micro-batches, stop votes, seen, skipped, bad shards], on the host."""
    ready: torch.cuda.Event | None
    """Recorded after the copy to the host (CUDA); None: already there."""


class PinnedPair:
    """Two pinned host buffers used in turn (on CUDA; plain ones elsewhere), for the small copies between host
    and device each step, without a wait and without pinning new memory every step. A buffer is used again
    two steps after its copy was queued, and by then the guard has waited for that step, so the copy is done."""

    def __init__(self, size: int, device: torch.device):
        self.buffers = [torch.zeros(size, dtype=torch.float64, pin_memory=device.type == "cuda") for _ in range(2)]
        self.turn = 0

    def next(self) -> torch.Tensor:
        buffer = self.buffers[self.turn]
        self.turn = 1 - self.turn
        return buffer


class StepGuard:
    FIELDS = 5

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
        self.deferred = config.engine.nonfinite_loss == "stop"
        """Whether a step's numbers are read one step late (see the module's docstring)."""
        self.up = PinnedPair(self.FIELDS - 1, device)
        """The stop request and the step's counts, on their way to the device."""
        self.down = PinnedPair(self.FIELDS, device)
        """The step's sums, on their way to the host."""
        self.step_sums: torch.Tensor | None = None
        """The current step's shared vectors summed over its micro-batches (on the device)."""
        self.pending: deque[_Pending] = deque()

    def share(self, loss: torch.Tensor, batch_counts: tuple[int, int, int] | None) -> torch.Tensor:
        """The micro-batch's loss averaged over ranks, after the all-reduce that also carries this rank's
        stop request and (for a step's first micro-batch) its ``(seen, skipped, bad shards)`` counts.
        Nothing is read on the host here."""
        if batch_counts is not None:
            staged = self.up.next()
            staged.copy_(torch.tensor([float(self.stop_requested), *batch_counts], dtype=torch.float64))
            extra = staged.to(self.device, non_blocking=True)
        else:
            extra = torch.zeros(self.FIELDS - 1, dtype=torch.float64, device=self.device)
        shared = sum_tensor(torch.cat([loss.detach().double().reshape(1), extra]))
        self.step_sums = shared if self.step_sums is None else self.step_sums + shared
        return shared[0] / self.world_size

    def finite_now(self, step_loss: torch.Tensor, step: int) -> bool:
        """``skip`` mode: whether a micro-batch's shared loss is finite, read at once (a host wait); a
        non-finite one is counted, or stops the run past ``engine.max_nonfinite_steps``."""
        if torch.isfinite(step_loss):
            return True
        self.nonfinite(step_loss.item(), step)
        return False

    def end_step(self, step: int, settle: bool) -> None:
        """Queue the step's numbers for the host; act on the previous step's (all of them with ``settle``,
        and always in ``skip`` mode)."""
        sums, self.step_sums = self.step_sums, None
        if sums is not None:
            self.pending.append(self._to_host(step, sums))
        keep = 1 if self.deferred and not settle else 0
        while len(self.pending) > keep:
            self._act(self.pending.popleft())

    def settle(self) -> None:
        """Act on every step so far (before a checkpoint, a log line, an evaluation)."""
        while self.pending:
            self._act(self.pending.popleft())

    def _to_host(self, step: int, sums: torch.Tensor) -> _Pending:
        if sums.device.type != "cuda":
            return _Pending(step, sums, None)
        host = self.down.next()
        host.copy_(sums, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Pending(step, host, ready)

    def _act(self, pending: _Pending) -> None:
        if pending.ready is not None:
            pending.ready.synchronize()  # the step is long queued behind: this waits for it alone
        loss, stop, seen, skipped, bad_shards = pending.values.tolist()
        self.preempted = self.preempted or stop > 0
        self._count_data(int(seen), int(skipped), int(bad_shards))
        if self.deferred and not math.isfinite(loss):
            self.nonfinite(loss / self.world_size, pending.step)

    def _count_data(self, seen: int, skipped: int, bad_shards: int) -> None:
        """Add a step's sample and bad-data counts (summed over ranks); too much bad data stops training."""
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

    def nonfinite(self, loss: float, step: int) -> None:
        """Stop on a NaN/inf loss at ``step``, or skip the update and count it (``engine.nonfinite_loss``)."""
        engine = self.config.engine
        saved = self.saved_checkpoints()
        kept = f"the last checkpoint {saved[-1][1]} is intact" if saved else "no checkpoint was written yet"
        where = f"loss is {loss} (mean over all ranks) at step {step}; {kept}"
        if engine.nonfinite_loss == "stop":
            raise FloatingPointError(f"{where} (engine.nonfinite_loss=skip skips such steps instead)")
        self.nonfinite_steps += 1
        log.warning("%s; update skipped (%d so far)", where, self.nonfinite_steps)
        if self.nonfinite_steps > engine.max_nonfinite_steps:
            raise FloatingPointError(f"{where}; {self.nonfinite_steps} steps had non-finite losses, more than "
                                     f"engine.max_nonfinite_steps={engine.max_nonfinite_steps}: lower the learning "
                                     "rate or check the data")

    def state_dict(self) -> dict[str, Any]:
        self.settle()
        return {"data_counts": dict(self.data_counts), "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data_counts = dict(state["data_counts"])
        self.nonfinite_steps = state["nonfinite_steps"]
