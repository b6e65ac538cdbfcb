"""Streaming, exactly resumable readers of WebDataset shards.

Training streams are deterministic functions of (seed, epoch, shards, slots, workers). A
*slot* is one data-parallel share of the global batch: ``world_size x grad_accum_steps`` slots,
rank ``r`` holding slots ``r*accum .. r*accum+accum-1`` (one per micro-batch). Each epoch the
shard list is permuted with a seed shared by all ranks and split into ``slots x num_workers``
logical streams. Batch ``j`` of a slot comes from its logical stream ``j % num_workers``, so
the loader's round-robin over workers yields the batches in order, and any world size with
the same ``world x accum`` product reads exactly the same global batches. Every batch says how
many raw (undecoded) samples it consumed from its stream, unreadable ones included; the trainer
sums them per stream into the data position it checkpoints, and a resumed stream skips exactly
that many raw samples. Every sample's augmentation is seeded from (seed, epoch, sample id), so
a resumed run sees the same pixels as an uninterrupted one, also after skipped samples.

Logical streams repeat their shards as needed, so every rank yields exactly the number of
batches the epoch asks for, whatever the shard sizes (no collective hangs on uneven ranks).

Bad data never raises in a loader worker: unreadable samples and shards are skipped with a
warning and counted, and the counts travel with the next :class:`Batch`.
"""
from __future__ import annotations

import io
import itertools
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from trivit.datasets.bad_data import BadData

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls: str) -> list[str]:
    """Brace-expand ``urls`` ('::' joins several sources); an empty result is an error."""
    expanded = wds.shardlists.expand_urls(urls) if urls else []
    if not expanded:
        raise ValueError(f"no shards in {urls!r}: give brace-expanded paths like '/data/train-{{000000..000099}}.tar'")
    return expanded


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers, stable across processes and Python versions (SplitMix64 steps)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state >> 1


@contextmanager
def seeded_rng(seed: int, restore: bool = True) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global RNGs inside the block, and restore them after.

    timm's transforms draw from the global RNGs. In the training process, restoring them keeps
    its random stream (dropout, mixup) independent of how many images it decoded; a loader
    worker has no other use for them and skips the restore (``restore=False``).
    """
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would queue a CUDA call per image
    try:
        yield
    finally:
        if states is not None:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` as an 8-bit ``mode`` image. 16- and 32-bit integer images (16-bit PNGs: mode 'I;16')
    are scaled to 0..255 first, as 16-bit values divided by 257; a plain ``convert`` clips them at 255."""
    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() <= 65535 else float(pixels.max())
        image = Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    return image.convert(mode)


@dataclass(frozen=True)
class SampleDecoder:
    """Turns a raw shard sample into ``(uint8 image, class index, sample id, erase box)``
    (datasets/transforms.py: the device finishes the image)."""

    transform: Callable[[Image.Image], tuple[torch.Tensor, torch.Tensor]]
    mode: str
    """PIL mode the image is converted to ('L' or 'RGB')."""
    num_classes: int | None = None
    """The model's classes: a label outside 0 .. num_classes - 1 makes the sample bad data (None: unchecked)."""

    def __call__(self, sample: dict[str, Any], seed: int) -> Decoded:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        missing = [name for name, present in (("image", key), ("cls", "cls" in sample), ("id", "id" in sample))
                   if not present]
        if missing:
            raise ValueError(f"no {' or '.join(missing)} field")
        sample_id, label = int(sample["id"]), int(sample["cls"])
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} is outside the model's {self.num_classes} classes (0 .. "
                             f"{self.num_classes - 1}): the shard and its index disagree, or model.num_classes is "
                             "too small")
        plan = None
        with Image.open(io.BytesIO(sample[key])) as image, \
                seeded_rng(mix_seed(seed, sample_id), restore=get_worker_info() is None):
            if getattr(self.transform, "takes_encoded", False):  # data.decode_on: device
                pixels, erase, plan = self.transform(sample[key], image, self.mode)
            else:
                pixels, erase = self.transform(to_mode(image, self.mode))
        return pixels, label, sample_id, erase, plan


_shard_note: Callable[[str], None] | None = None
"""Set in a loader worker: records the shard it is about to read (datasets/loaders.py)."""


def set_shard_note(note: Callable[[str], None] | None) -> None:
    global _shard_note
    _shard_note = note


def named(shards: list[str]) -> str:
    """A stream's shards in an error message: the first three."""
    return f"{shards[:3]}{' ...' if len(shards) > 3 else ''}"


def noted_shard(shard: dict[str, Any]) -> dict[str, Any]:
    """A stage before a shard is opened: tell the loader which shard this worker reads now."""
    if _shard_note is not None:
        _shard_note(shard["url"])
    return shard


class Batch(NamedTuple):
    images: torch.Tensor | list[torch.Tensor]
    """uint8 (B, C, H, W): the device normalises them (``DeviceTransform``); with a ``plan``
    (``data.decode_on: device``), each image's JPEG bytes or decoded image, for the device to decode and augment."""
    labels: torch.Tensor
    ids: torch.Tensor
    skipped: int
    """Samples this worker skipped as unreadable since its previous batch."""
    bad_shards: int
    """Shards this worker could not read (or read to the end) since its previous batch."""
    consumed: tuple[int, ...] = ()
    """Raw samples each slot's stream gave for this batch, unreadable ones included (slot order)."""
    erase: torch.Tensor | None = None
    """(B, 4) int32: each image's random-erasing box (top, left, height, width; height 0: none)."""
    plan: torch.Tensor | None = None
    """(B, columns) float64: each image's drawn augmentation, for ``DeviceAugment`` (``data.decode_on: device``)."""


Decoded = tuple[torch.Tensor, int, int, torch.Tensor, torch.Tensor | None]
"""A decoded sample: uint8 image (or the bytes the device decodes), class index, sample id, erase box, and the
drawn augmentation the device paints (None: the image is augmented already)."""


def decoded_batches(samples: Iterator[dict[str, Any]], decode: Callable[[dict[str, Any]], Decoded],
                    batch_size: int, partial: bool, bad: BadData) -> Iterator[Batch]:
    """Decode samples into batches, skipping (and counting) the ones that fail to decode."""
    pending: list[Decoded] = []
    consumed = 0
    for sample in samples:
        consumed += 1
        try:
            pending.append(decode(sample))
        except Exception as error:  # noqa: BLE001 - a bad sample must not stop a week-long run
            bad.sample(sample, error)
            continue
        bad.decoded += 1
        if len(pending) == batch_size:
            yield collate(pending, bad, consumed)
            pending, consumed = [], 0
    if pending and partial:
        yield collate(pending, bad, consumed)
    elif partial and (bad.skipped or bad.bad_shards):
        empty = torch.empty(0, dtype=torch.long)
        yield Batch(torch.empty(0), empty, empty, *bad.take(), (consumed,))  # the counts of the stream's tail


def concatenate(parts: tuple[Batch, ...]) -> Batch:
    """One batch from several, in order, with their bad-data counts summed."""
    if len(parts) == 1:
        return parts[0]
    erase = [p.erase for p in parts if p.erase is not None]
    plans = [p.plan for p in parts if p.plan is not None]
    images = sum((list(p.images) for p in parts), []) if plans else torch.cat([p.images for p in parts])
    return Batch(images, torch.cat([p.labels for p in parts]),
                 torch.cat([p.ids for p in parts]), sum(p.skipped for p in parts), sum(p.bad_shards for p in parts),
                 sum((p.consumed for p in parts), ()), torch.cat(erase) if erase else None,
                 torch.cat(plans) if plans else None)


def collate(samples: list[Decoded], bad: BadData, consumed: int) -> Batch:
    images, labels, ids, erase, plans = zip(*samples)
    planned = plans[0] is not None
    return Batch(list(images) if planned else torch.stack(images), torch.tensor(labels), torch.tensor(ids),
                 *bad.take(), (consumed,), torch.stack(erase), torch.stack(plans) if planned else None)


@dataclass(frozen=True)
class StreamLayout:
    """How one epoch's batches are laid out over data-parallel slots and loader workers."""

    urls: tuple[str, ...]
    seed: int
    epoch: int
    slots: tuple[int, ...]
    """This rank's slots, one per micro-batch of a step (``rank*accum ..``)."""
    num_slots: int
    """All slots: world size x gradient-accumulation steps."""
    num_streams: int
    """Logical streams per slot: max(1, num_workers)."""
    resampled: bool = False
    """Every stream draws shards with replacement from all of them (no split by slot and worker)."""

    @classmethod
    def for_rank(cls, urls: tuple[str, ...], *, seed: int, epoch: int, rank: int, world_size: int,
                 accum_steps: int = 1, num_workers: int = 0, resampled: bool = False) -> StreamLayout:
        slots = tuple(range(rank * accum_steps, (rank + 1) * accum_steps))
        return cls(urls, seed, epoch, slots, world_size * accum_steps, max(1, num_workers), resampled)

    def shards(self, slot: int, stream: int) -> list[str]:
        """Shards of logical ``stream`` of ``slot``, from the epoch's shared permutation (all when resampled)."""
        if self.resampled:
            return list(self.urls)
        order = list(self.urls)
        random.Random(mix_seed(self.seed, self.epoch)).shuffle(order)
        return order[slot * self.num_streams + stream:: self.num_slots * self.num_streams]

    def batches(self, stream: int, start: int, stop: int) -> tuple[int, int]:
        """(batches of ``stream`` before ``start``, batches of ``stream`` in [start, stop))."""
        before = len(range(stream, start, self.num_streams))
        return before, len(range(stream, stop, self.num_streams)) - before

    def stream_of(self, step: int) -> int:
        """The logical stream that batch ``step`` of the epoch comes from."""
        return step % self.num_streams


StreamPosition = list[list[int]]
"""Raw samples consumed so far this epoch, per slot of the rank (slot order) and per logical stream."""


def full_batches_position(layout: StreamLayout, start: int, batch_size: int) -> StreamPosition:
    """The position before step ``start`` if no sample was unreadable (every batch took ``batch_size``)."""
    return [[layout.batches(stream, start, start)[0] * batch_size for stream in range(layout.num_streams)]
            for _ in layout.slots]


class TrainStream(IterableDataset):
    """Steps ``start..stop-1`` of one epoch for one rank: each item is the rank's micro-batches,
    one per slot of :class:`StreamLayout`, concatenated in slot order; see the module docstring.

    ``position`` says how many raw samples each slot's streams gave before ``start``.
    """

    def __init__(self, layout: StreamLayout, decode: SampleDecoder, *, batch_size: int, start: int, stop: int,
                 position: StreamPosition, shuffle_buffer: int, shuffle_initial: int | None = None,
                 active: np.ndarray | None = None,
                 id_offsets: dict[str, int] | None = None):
        super().__init__()
        self.layout, self.decode = layout, decode
        self.batch_size, self.start, self.stop = batch_size, start, stop
        """``batch_size`` is one slot's micro-batch."""
        self.position = position
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_initial = min(shuffle_buffer, shuffle_initial or shuffle_buffer)
        """Samples buffered before the first is handed out (None: the whole buffer, as before data.shuffle_initial)."""
        self.active = active
        self.id_offsets = id_offsets or {}
        """Added to the ids of each shard's samples (joined sources, see ``resolve_shards``)."""

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = self.layout.stream_of(self.start + worker)
        _, count = self.layout.batches(stream, self.start, self.stop)
        per_slot = [itertools.islice(self._slot_batches(slot, stream, self.position[index][stream]), count)
                    for index, slot in enumerate(self.layout.slots)]
        return (concatenate(parts) for parts in zip(*per_slot))

    def _slot_batches(self, slot: int, stream: int, skip: int) -> Iterator[Batch]:
        layout = self.layout
        bad = BadData()
        epoch_seed = mix_seed(layout.seed, layout.epoch)
        samples = self._samples(layout.shards(slot, stream), mix_seed(layout.seed, layout.epoch, slot, stream), bad)
        for _ in itertools.islice(samples, skip):
            pass
        bad.take()  # shards that failed before the resume point were counted by the run that read them
        yield from decoded_batches(samples, lambda s: self.decode(s, epoch_seed), self.batch_size, False, bad)

    def _samples(self, shards: list[str], seed: int, bad: BadData) -> Iterator[dict[str, Any]]:
        """Raw samples of the stream's shards, pass after pass, shuffled within each pass.

        The shuffle buffer drains at the end of every pass, so each pass presents every sample
        exactly once; the shard order is re-permuted for every further pass. Resampled streams
        instead draw shard after shard with replacement, endlessly.
        """
        rng = random.Random(seed)
        if self.layout.resampled:
            yield from wds.DataPipeline(
                lambda: ({"url": rng.choice(shards)} for _ in itertools.count()),
                wds.map(noted_shard),
                wds.tarfile_to_samples(handler=bad.shard),
                wds.map(self._global_id),
                wds.select(self._is_active),
                wds.shuffle(self.shuffle_buffer, initial=self.shuffle_initial, rng=rng),
            )
        order = list(shards)
        while True:
            presented, decoded = 0, bad.decoded
            for sample in wds.DataPipeline(
                wds.SimpleShardList(order),
                wds.map(noted_shard),
                wds.tarfile_to_samples(handler=bad.shard),
                wds.map(self._global_id),
                wds.select(self._is_active),
                wds.shuffle(self.shuffle_buffer, initial=self.shuffle_initial, rng=rng),
            ):
                presented += 1
                yield sample
            if presented == 0:
                error = f" (the last error: {bad.last_error})" if bad.last_error else ""
                raise ValueError(f"training shards {named(order)} hold no (active) samples for this stream{error}; "
                                 "check data.train_urls")
            if bad.decoded == decoded:  # the stream would read these shards forever without a batch
                raise ValueError(f"no sample of the training shards {named(order)} could be used, in a whole pass "
                                 f"over them; the last: {bad.last_error}")
            rng.shuffle(order)

    def _global_id(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample with its id moved into the run's global id space (its source's offset added)."""
        offset = self.id_offsets.get(sample.get("__url__"), 0)
        if offset and "id" in sample:
            try:
                sample["id"] = int(sample["id"]) + offset
            except ValueError:
                pass  # the decoder reports and skips it
        return sample

    def _is_active(self, sample: dict[str, Any]) -> bool:
        """The example level's filter: reads only the id, before any image is decoded."""
        if self.active is None:
            return True
        if "id" not in sample:
            return True  # the decoder reports and skips it
        sample_id = int(sample["id"])
        if not 0 <= sample_id < len(self.active):
            raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has id {sample_id}, "
                             f"outside the {len(self.active)} training samples of the index")
        return bool(self.active[sample_id])


class EvalStream(IterableDataset):
    """Every sample of this rank's share of the validation split, once, in shard order.

    The readers are every rank's loader workers, reader ``rank + world x worker`` of ``world x workers``
    (:func:`eval_share`): with at least as many shards as readers each reader takes whole shards
    (within one shard of every other); with fewer, each shard is split by sample among the readers
    that share it, so every rank and worker decodes a share at any world size.
    """

    def __init__(self, urls: list[str], decode: SampleDecoder, *, batch_size: int, rank: int, world_size: int):
        super().__init__()
        self.urls, self.decode, self.batch_size = urls, decode, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shards, member, group = eval_share(self.urls, self.rank + self.world_size * worker, self.world_size * workers)
        bad = BadData()
        if not shards:
            return iter(())
        samples = wds.DataPipeline(wds.SimpleShardList(shards), wds.map(noted_shard),
                                   wds.tarfile_to_samples(handler=bad.shard))
        mine = (sample for position, sample in enumerate(samples) if position % group == member)
        return decoded_batches(mine, lambda s: self.decode(s, 0), self.batch_size, True, bad)


def eval_share(urls: list[str], reader: int, readers: int) -> tuple[list[str], int, int]:
    """(shards, member, group) of ``reader`` among ``readers``: it decodes the samples of ``shards`` whose position
    (in the order they are read) is ``member`` modulo ``group``. At least as many shards as readers: every
    ``readers``-th shard, whole; fewer: shard ``reader mod len(urls)``, shared by the readers congruent to it."""
    if len(urls) >= readers:
        return urls[reader::readers], 0, 1
    shard = reader % len(urls)
    return [urls[shard]], reader // len(urls), len(range(shard, readers, len(urls)))
