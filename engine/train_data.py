"""The loop's training data: each epoch's loader over this rank's streams, the exact stream position a checkpoint
keeps, and the device's half of the image pipeline (datasets/transforms.py)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch

from trivit.datasets.device_augment import device_augment, device_train_transform
from trivit.datasets.loaders import ShardLoader, train_loader
from trivit.datasets.stream import Batch, SampleDecoder, StreamPosition, full_batches_position
from trivit.datasets.transforms import DeviceTransform, image_mode, train_transform
from trivit.engine.startup import RunSetup

log = logging.getLogger(__name__)


class TrainData:
    def __init__(self, setup: RunSetup, stop_requested: Callable[[], bool]):
        config, data = setup.config, setup.config.data
        self.setup, self.stop_requested = setup, stop_requested
        size = config.model.img_size
        on_device = data.decode_on == "device"
        transform = device_train_transform(data, size) if on_device else train_transform(data, size)
        self.decoder = SampleDecoder(transform, image_mode(config.model.in_chans), setup.num_classes)
        self.device_augment = device_augment(data, size, setup.device) if on_device else None
        if on_device and setup.device.type == "cpu":
            log.warning("data.decode_on=device on a CPU: the training process decodes and augments every image "
                        "itself; data.decode_on=worker spreads that work over the loader workers")
        self.device_images = DeviceTransform(data.mean, data.std, setup.device)
        self.shuffle_initial: int | None = data.shuffle_initial
        """Samples a stream buffers before its first (None: the whole buffer, for a run begun before the setting)."""
        self.position: StreamPosition = []
        """Raw samples this rank's streams gave in the current epoch (its exact data position)."""
        self.early: tuple[tuple[int, int, int], ExitStack, Iterator[Batch]] | None = None
        """An epoch's batches whose workers :meth:`start_early` started: (epoch, start, stop), their context, them."""

    def settings(self) -> dict[str, Any]:
        """What the data position depends on (a checkpoint must match it to resume), the shuffle's first fill included."""
        return {**self.setup.data_settings(), "shuffle_initial": self.shuffle_initial}

    def adopt(self, saved_settings: dict[str, Any]) -> None:
        """A checkpoint's data settings: a run begun before ``data.shuffle_initial`` keeps its whole-buffer fill."""
        if "shuffle_initial" not in saved_settings:
            self.shuffle_initial = None

    def restore(self, rank_state: dict[str, Any], epoch: int, offset: int) -> None:
        """A checkpoint's stream position for this rank (older ones: that of full batches up to step ``offset``)."""
        self.position = rank_state.get("stream_position") or full_batches_position(
            self.setup.layout(epoch), offset, self.setup.micro_batch)

    def begin_epoch(self, epoch: int) -> None:
        self.position = full_batches_position(self.setup.layout(epoch), 0, self.setup.micro_batch)

    def advance(self, batch: Batch, epoch: int, offset: int) -> None:
        """Count the raw samples the step's batch (step ``offset`` of ``epoch``) took from its stream."""
        stream = self.setup.layout(epoch).stream_of(offset)
        for slot, consumed in enumerate(batch.consumed):
            self.position[slot][stream] += consumed

    def loader(self, epoch: int, start: int, stop: int, active: np.ndarray | None) -> ShardLoader:
        """This rank's loader for steps ``start .. stop - 1`` of ``epoch``, from the current position."""
        setup, data = self.setup, self.setup.config.data
        return train_loader(setup.layout(epoch), self.decoder, batch_size=setup.micro_batch, start=start, stop=stop,
                            position=[list(p) for p in self.position], shuffle_buffer=data.shuffle_buffer,
                            shuffle_initial=self.shuffle_initial, num_workers=data.num_workers, active=active,
                            id_offsets=setup.shards.id_offsets, pin_memory=setup.device.type == "cuda",
                            timeout_s=setup.config.engine.timeout_s, stop_requested=self.stop_requested)

    def start_early(self, epoch: int, start: int, stop: int, active: np.ndarray | None) -> None:
        """Start the workers of ``epoch``'s loader now, so that they read, fill their shuffle buffers and decode
        their first batches while this process does something else (the evaluation at an epoch's end);
        :meth:`batches` hands them over. The epoch must be planned (its position begun) already."""
        self.discard_early()
        stack = ExitStack()
        batches = stack.enter_context(self.loader(epoch, start, stop, active).batches())
        self.early = (epoch, start, stop), stack, batches

    def discard_early(self) -> None:
        """Shut down workers started early and not used (the run ended, or stopped, before their epoch)."""
        if self.early is not None:
            self.early[1].close()
            self.early = None

    @contextmanager
    def batches(self, epoch: int, start: int, stop: int, active: np.ndarray | None) -> Iterator[Iterator[Batch]]:
        """This rank's batches for steps ``start .. stop - 1`` of ``epoch`` (those started early when they are
        the same steps); the wait for the first is logged."""
        early, self.early = self.early, None
        with ExitStack() as stack:
            if early is not None and early[0] == (epoch, start, stop):
                stack.push(early[1].pop_all())
                batches = early[2]
            else:
                if early is not None:
                    early[1].close()
                batches = stack.enter_context(self.loader(epoch, start, stop, active).batches())
            yield self._timed_first(batches, epoch, started_early=early is not None)

    @staticmethod
    def _timed_first(batches: Iterator[Batch], epoch: int, started_early: bool) -> Iterator[Batch]:
        start = time.perf_counter()
        for index, batch in enumerate(batches):
            if index == 0:
                log.info("epoch %d: first batch after %.2f s%s", epoch, time.perf_counter() - start,
                         " (its workers started before the epoch)" if started_early else "")
            yield batch

    def images(self, batch: Batch) -> torch.Tensor:
        """The rank's batch on the training device, normalised and erased there (no host wait); with
        ``data.decode_on: device`` decoded and augmented there first."""
        device = self.setup.device
        if self.device_augment is not None and batch.plan is not None:
            pixels = self.device_augment(batch.images, batch.plan)
        else:
            pixels = batch.images.to(device, non_blocking=True)
        return self.device_images(pixels, batch.erase.to(device, non_blocking=True))
