"""DataLoaders over the shard streams: their worker processes, and the start-up check on shard counts.

One loader per epoch (training) or per evaluation; see ``trivit.datasets.stream`` for what the
streams read and :class:`ShardLoader` for how their workers are started and stopped.
"""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from trivit.datasets.stream import (
    Batch,
    EvalStream,
    SampleDecoder,
    StreamLayout,
    StreamPosition,
    TrainStream,
    full_batches_position,
    mix_seed,
    set_shard_note,
)


class ShardLoader(DataLoader):
    """A ``DataLoader`` whose workers leave SIGTERM to the training process until it is done with them.

    Schedulers and launchers signal a job's whole process group on pre-emption; a worker that
    died of it would fail the step the trainer is finishing before it writes its checkpoint, so
    workers ignore SIGTERM. Iterate through :meth:`batches`: on every exit from it (the end, an
    exception, Ctrl-C) the workers are released and shut down there and then, so neither an
    error's traceback (which keeps the iterator alive) nor the next loader's fork finds them.
    A worker that ignored SIGTERM for good would make the process hang at exit.
    """

    def __init__(self, dataset: IterableDataset, timeout_s: float | None = None,
                 stop_requested: Callable[[], bool] = lambda: False, **kwargs: Any):
        context = worker_context()
        workers = kwargs.get("num_workers") or 0
        self.released = context.Event()
        self.reading = context.Array("c", READING_SLOT * max(1, workers), lock=False)
        """Each worker's shard being read (what a stalled read is reported with)."""
        self.timeout_s = timeout_s if workers else None
        """The longest wait for one batch; None: unbounded (no workers: the read runs in this process)."""
        self.stop_requested = stop_requested
        """Asked while waiting for a batch: True (SIGTERM) ends the wait with :class:`DataWaitStopped`."""
        super().__init__(dataset, batch_size=None, worker_init_fn=functools.partial(_worker_setup, self.released,
                                                                                    self.reading),
                         multiprocessing_context=context if workers else None,
                         timeout=min(POLL_S, timeout_s) if self.timeout_s else 0, **kwargs)

    @contextmanager
    def batches(self) -> Iterator[Iterator[Batch]]:
        with _sigterm_blocked():  # a worker forked now gets a SIGTERM only once it ignores it (_worker_setup)
            iterator = iter(self)
        try:
            yield self._bounded(iterator)
        finally:
            self.released.set()
            shutdown = getattr(iterator, "_shutdown_workers", None)  # what the iterator's __del__ calls
            if shutdown is not None:
                shutdown()

    def _bounded(self, iterator: Iterator[Batch]) -> Iterator[Batch]:
        """``iterator``, where a worker that sends nothing for ``timeout_s`` seconds ends the run naming its shard,
        and a stop request (SIGTERM) ends the wait. DataLoader waits in slices of ``POLL_S``; a slice that
        runs out leaves its iterator as it was, so the next ``next`` waits on for the same batch."""
        while True:
            waited = 0.0
            while True:
                try:
                    batch = next(iterator)
                    break
                except StopIteration:
                    return
                except Exception as error:
                    if "in DataLoader worker process" in str(error):  # the worker's own error, not its traceback
                        raise worker_error(error) from None
                    if not isinstance(error, RuntimeError) or "DataLoader timed out" not in str(error):
                        raise
                waited += self.timeout
                if self.stop_requested():
                    raise DataWaitStopped(f"SIGTERM while waiting {waited:g} s for a batch; its workers were "
                                          f"reading {self.shards_being_read() or 'no shard yet'}")
                if waited >= self.timeout_s:
                    raise TimeoutError(
                        f"no batch from the data loader in {waited:g} s (engine.timeout_s): its workers were "
                        f"reading {self.shards_being_read() or 'no shard yet'}. A pipe: command or a filesystem read "
                        "stalled there: check that shard's source, or raise engine.timeout_s")
            yield batch

    def shards_being_read(self) -> list[str]:
        raw = bytes(self.reading[:])
        slots = (raw[i:i + READING_SLOT].rstrip(b"\0").decode(errors="replace")
                 for i in range(0, len(raw), READING_SLOT))
        return [slot for slot in slots if slot]


def worker_error(error: Exception) -> Exception:
    """An error torch re-raised from a loader worker ("Caught X in DataLoader worker process N. Original
    Traceback ... X: message") as the same kind of error with the original message alone."""
    last = str(error).strip().splitlines()[-1]
    message = last.split(": ", 1)[1] if ": " in last else last
    try:
        return type(error)(message)
    except Exception:  # noqa: BLE001 - an error type that takes other arguments
        return RuntimeError(message)


class DataWaitStopped(Exception):
    """A stop was requested (SIGTERM) while the loader waited for a batch."""


POLL_S = 5.0
"""How often a wait for a batch looks at the stop request and the time waited."""
READING_SLOT = 1024
"""Bytes of a worker's shard URL kept for the stall report (longer ones are cut)."""


FORK_SAFE_PYTHON = (3, 11, 8)
"""CPython from which a forked child cannot inherit a held thread-state lock (gh-112275; 3.12.0 still can)."""
WORKER_SERVER_PRELOAD = ["torch", "trivit.datasets.stream", "trivit.datasets.transforms", __name__]
"""What the fork server imports once, so that each worker only unpickles its stream."""


def worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers start: forked, or from a fork server where forking could deadlock.

    On CPython before 3.11.8 (and 3.12.0) a forked child deadlocks when another thread of the
    parent was creating a Python thread state at that instant (gh-112275). Once a process group
    exists, its communication threads (gloo's run loops, NCCL's watchdog) do just that whenever
    they release a tensor that Python handed to a collective, so on those versions a distributed
    run's workers are forked from a fork server, a process without such threads. It starts once
    per process (:func:`start_worker_server`), and each worker then receives its stream pickled.
    """
    if forking_can_deadlock(sys.version_info[:3]) and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(WORKER_SERVER_PRELOAD)
        return context
    return multiprocessing.get_context("fork")


def forking_can_deadlock(version: tuple[int, int, int]) -> bool:
    """Whether this CPython ``version`` has gh-112275 (fixed in 3.11.8 and 3.12.1)."""
    return version < FORK_SAFE_PYTHON or version == (3, 12, 0)


def start_worker_server() -> None:
    """Start the fork server now if workers will come from one, so that its imports (about 2 s)
    overlap the run's set-up rather than delay the first step."""
    if worker_context().get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()


def _worker_setup(released: Event, reading: Any, worker_id: int) -> None:
    """In a loader worker: ignore SIGTERM until the loader is released, then exit on it; record the shard
    it reads in its slot of ``reading``; and, when the worker came from the fork server, let the server
    outlive only the training process."""
    def note(url: str) -> None:
        encoded = url.encode()[:READING_SLOT - 1]
        start = worker_id * READING_SLOT
        reading[start:start + READING_SLOT] = encoded + b"\0" * (READING_SLOT - len(encoded))

    set_shard_note(note)

    def on_sigterm(signum: int, frame: Any) -> None:
        if released.is_set():
            kill_descendants(os.getpid())  # a pipe: shard's shell and its command would outlive the worker
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _release_fork_server()


def kill_descendants(pid: int) -> None:
    """SIGKILL every process below ``pid``, the deepest first (Linux's /proc; elsewhere nothing)."""
    for child in child_pids(pid):
        kill_descendants(child)
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


@contextmanager
def _sigterm_blocked() -> Iterator[None]:
    """SIGTERM held back in this thread (and so in the workers forked meanwhile) for the block.

    A scheduler signals the whole process group; a worker that received it between its fork and
    :func:`_worker_setup` would die of it (torch's worker handler re-raises it), failing the step the
    trainer is finishing. Held back, it reaches the worker once its own handler is in place, and the
    training process as soon as the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _release_fork_server() -> None:
    """Close this worker's copy of the fork server's keep-alive pipe.

    The server exits when every holder of that pipe has closed it, and multiprocessing hands a
    copy to each process it forks, so that they can start processes of their own. A loader worker
    starts none; were it to keep its copy, a training process killed outright (SIGKILL, the OOM
    killer) would leave the server running, the worker's check on its parent (the server) would
    keep finding it alive, and both would linger, holding the job's stdout and stderr open.
    """
    server = multiprocessing.forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None


def check_enough_shards(layout: StreamLayout) -> None:
    """Every (slot, worker) stream needs a shard of its own, or it would yield nothing and the ranks would hang."""
    needed = layout.num_slots * layout.num_streams
    if not layout.resampled and len(layout.urls) < needed:
        raise ValueError(
            f"{len(layout.urls)} training shards for {layout.num_slots} data-parallel slots (ranks x gradient "
            f"accumulation steps) x {layout.num_streams} workers: every worker needs at least one shard, or it "
            f"would yield nothing and the ranks would hang. Use data.num_workers <= "
            f"{max(1, len(layout.urls) // layout.num_slots)}, data.resampled=true "
            "(each worker draws shards with replacement), or write more, smaller shards."
        )


def train_loader(layout: StreamLayout, decode: SampleDecoder, *, batch_size: int, start: int, stop: int,
                 shuffle_buffer: int, num_workers: int, shuffle_initial: int | None = None,
                 position: StreamPosition | None = None,
                 active: np.ndarray | None = None, id_offsets: dict[str, int] | None = None,
                 pin_memory: bool = False, timeout_s: float | None = None,
                 stop_requested: Callable[[], bool] = lambda: False) -> ShardLoader:
    """Loader over steps ``start..stop-1`` of ``layout``'s epoch; ``num_workers`` must match the layout.

    ``batch_size`` is one slot's micro-batch; each item holds one per slot of the rank.
    ``position`` is the raw samples consumed before ``start``; the default assumes every sample
    before it was readable (:func:`full_batches_position`), the trainer passes the exact one.
    ``active`` (a boolean array over sample ids) drops every other sample before decoding;
    ``id_offsets`` (per shard URL) moves joined sources' ids into one space; ``pin_memory`` when
    training on CUDA; ``timeout_s`` bounds the wait for each batch (with workers), which ``stop_requested``
    (SIGTERM) may end sooner.

    Workers are started for each epoch rather than kept (``persistent_workers``): an epoch's
    streams depend on what is decided when it begins (the shard permutation, the example
    level's active set), and a stream's shuffle buffer drains at the end of every pass by
    design, so a kept worker would carry nothing over. Starting them costs about a second per
    epoch.
    """
    if num_workers and layout.num_streams != num_workers:
        raise ValueError(f"layout has {layout.num_streams} streams but the loader {num_workers} workers")
    check_enough_shards(layout)
    dataset = TrainStream(layout, decode, batch_size=batch_size, start=start, stop=stop,
                          position=position or full_batches_position(layout, start, batch_size), shuffle_buffer=shuffle_buffer,
                          shuffle_initial=shuffle_initial, active=active, id_offsets=id_offsets)
    return ShardLoader(dataset, num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory,
                       timeout_s=timeout_s, stop_requested=stop_requested,
                       generator=torch.Generator().manual_seed(mix_seed(layout.seed, layout.epoch, start)))


def eval_loader(urls: list[str], decode: SampleDecoder, *, batch_size: int, rank: int, world_size: int,
                num_workers: int, pin_memory: bool = False, timeout_s: float | None = None) -> ShardLoader:
    """Loader over every sample of this rank's share of ``urls``.

    Its own generator keeps the global RNG untouched, so evaluating never changes training.
    """
    dataset = EvalStream(urls, decode, batch_size=batch_size, rank=rank, world_size=world_size)
    return ShardLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, timeout_s=timeout_s,
                       generator=torch.Generator().manual_seed(0))
