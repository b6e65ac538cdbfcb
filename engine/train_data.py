"""The loop's training data: each epoch's loader over this rank's streams, the exact stream position a checkpoint
keeps, and the device's half of the image pipeline (datasets/transforms.py)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from trivit.datasets.loaders import ShardLoader, train_loader
from trivit.datasets.stream import Batch, SampleDecoder, StreamPosition, full_batches_position
from trivit.datasets.transforms import DeviceTransform, image_mode, train_transform
from trivit.engine.startup import RunSetup


class TrainData:
    def __init__(self, setup: RunSetup, stop_requested: Callable[[], bool]):
        config, data = setup.config, setup.config.data
        self.setup, self.stop_requested = setup, stop_requested
        self.decoder = SampleDecoder(train_transform(data, config.model.img_size), image_mode(config.model.in_chans),
                                     setup.num_classes)
        self.device_images = DeviceTransform(data.mean, data.std, setup.device)
        self.shuffle_initial: int | None = data.shuffle_initial
        """Samples a stream buffers before its first (None: the whole buffer, for a run begun before the setting)."""
        self.position: StreamPosition = []
        """Raw samples this rank's streams gave in the current epoch (its exact data position)."""

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

    def images(self, images: torch.Tensor, erase: torch.Tensor) -> torch.Tensor:
        """A micro-batch's uint8 images, normalised and erased on the training device (no host wait)."""
        device = self.setup.device
        return self.device_images(images.to(device, non_blocking=True), erase.to(device, non_blocking=True))
