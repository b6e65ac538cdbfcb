"""The streaming reader: exact resume at any batch, batch counts, evaluation exactly once."""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from trivit.datasets.config import DataConfig
from trivit.datasets.loaders import eval_loader, train_loader
from trivit.datasets.stream import SampleDecoder, StreamLayout, expand_urls, seeded_rng
from trivit.datasets.transforms import eval_transform, train_transform

CONFIG = DataConfig(mean=[0.3], std=[0.3], auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, scale=[0.5, 1.0])


def layout(shards, epoch=0, workers=2, rank=0, world_size=1, accum_steps=1):
    urls = expand_urls(str(shards / "train-{000000..000007}.tar"))
    return StreamLayout.for_rank(tuple(urls), seed=7, epoch=epoch, rank=rank, world_size=world_size,
                                 accum_steps=accum_steps, num_workers=workers)


def batches(shards, start, stop, workers=2, epoch=0, **kw):
    decode = SampleDecoder(train_transform(CONFIG, 16), "L")
    return list(train_loader(layout(shards, epoch, workers, **kw), decode, batch_size=8, start=start, stop=stop,
                             shuffle_buffer=16, num_workers=workers))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("start", [1, 5, 6])
def test_resuming_at_any_batch_gives_the_same_pixels(tiny_shards, workers, start):
    full = batches(tiny_shards, 0, 12, workers)
    resumed = batches(tiny_shards, start, 12, workers)
    assert len(full) == 12 and len(resumed) == 12 - start
    for (x0, y0, i0, *_), (x1, y1, i1, *_) in zip(full[start:], resumed):
        assert torch.equal(i0, i1) and torch.equal(y0, y1) and torch.equal(x0, x1)


def test_an_epoch_has_exactly_the_requested_batches_and_new_epochs_reshuffle(tiny_shards):
    epoch0 = batches(tiny_shards, 0, 32)
    assert len(epoch0) == 32 and all(b[0].shape == (8, 1, 16, 16) for b in epoch0)
    counts = Counter(torch.cat([b[2] for b in epoch0]).tolist())
    assert len(counts) == 256 and set(counts.values()) == {1}, "one pass over 256 samples: each exactly once"
    epoch1 = batches(tiny_shards, 0, 32, epoch=1)
    assert not torch.equal(epoch0[0][2], epoch1[0][2])


def test_labels_travel_with_their_images(tiny_shards):
    for _, labels, ids, *_ in batches(tiny_shards, 0, 4, workers=0):
        assert torch.equal(labels, ids % 4)


def test_two_ranks_read_disjoint_shards(tiny_shards):
    ids = [torch.cat([b[2] for b in batches(tiny_shards, 0, 16, rank=r, world_size=2)]) for r in (0, 1)]
    assert len(set(ids[0].tolist()) & set(ids[1].tolist())) == 0
    assert len(set(ids[0].tolist()) | set(ids[1].tolist())) == 256


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_accumulation_with_the_same_product_read_the_same_global_batches(tiny_shards, workers):
    accumulated = batches(tiny_shards, 3, 10, workers, accum_steps=2)  # one rank, micro-batches of slots 0 and 1
    ranks = [batches(tiny_shards, 3, 10, workers, rank=r, world_size=2) for r in (0, 1)]
    assert len(accumulated) == 7 and all(b.images.shape[0] == 16 for b in accumulated)
    for step, batch in enumerate(accumulated):
        for part, rank_batches in zip(batch.images.split(8), ranks):
            assert torch.equal(part, rank_batches[step].images)
        assert torch.equal(batch.ids, torch.cat([rank_batches[step].ids for rank_batches in ranks]))


def test_too_few_shards_for_the_workers_is_a_clear_error(tiny_shards):
    with pytest.raises(ValueError, match="every worker needs at least one shard"):
        batches(tiny_shards, 0, 4, workers=5, world_size=2)


def test_evaluation_reads_every_sample_once(tiny_shards):
    urls = expand_urls(str(tiny_shards / "val-{000000..000001}.tar"))
    decode = SampleDecoder(eval_transform(CONFIG, 16), "L")
    ids = torch.cat([b[2] for b in eval_loader(urls, decode, batch_size=10, rank=0, world_size=1, num_workers=2)])
    assert sorted(ids.tolist()) == list(range(64))


def test_seeded_rng_restores_the_callers_random_streams():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with seeded_rng(123):
        inside = torch.rand(1)
    assert torch.equal(torch.rand(3), expected)
    with seeded_rng(123):
        assert torch.equal(torch.rand(1), inside)


def test_expand_urls_brace_and_join():
    assert expand_urls("a-{00..02}.tar::b.tar") == ["a-00.tar", "a-01.tar", "a-02.tar", "b.tar"]
    with pytest.raises(ValueError, match="no shards"):
        expand_urls("")


def test_deit_randaugment_survives_its_whole_magnitude_range():
    """rand-m9-mstd0.5-inc1 reaches posterize with 0 bits; the pinned Pillow must accept it."""
    from PIL import Image
    transform = train_transform(DataConfig(), 32)
    image = Image.new("RGB", (40, 40), (120, 30, 200))
    outputs = []
    for seed in range(4000):
        with seeded_rng(seed):
            outputs.append(transform(image)[0])
    assert all(o.shape == (3, 32, 32) for o in outputs)


def test_resampled_streams_serve_more_workers_than_shards_and_resume_exactly(tiny_shards):
    urls = expand_urls(str(tiny_shards / "train-{000000..000001}.tar"))
    decode = SampleDecoder(train_transform(CONFIG, 16), "L")

    def read(rank, start):
        layout = StreamLayout.for_rank(tuple(urls), seed=3, epoch=0, rank=rank, world_size=2, num_workers=2, resampled=True)
        return list(train_loader(layout, decode, batch_size=8, start=start, stop=10, shuffle_buffer=8, num_workers=2))

    full = read(0, 0)
    assert len(full) == 10 and len(read(1, 0)) == 10, "4 workers on 2 shards, none runs dry"
    ids = torch.cat([b.ids for b in full])
    assert set(ids.tolist()) <= set(range(64)) and len(set(ids.tolist())) < len(ids), "drawn with replacement"
    assert all(torch.equal(a.images, b.images) for a, b in zip(full[4:], read(0, 4)))


@pytest.mark.parametrize("mode, config", [("RGB", DataConfig()), ("L", CONFIG)])
def test_the_split_pipeline_makes_timms_one_process_pixels_bit_for_bit(mode, config):
    """Worker (uint8 and an erase box) + device (normalise, erase) against timm's whole DeiT training transform,
    normalisation and random erasing included, under the same per-sample seeds: equal to the bit."""
    from PIL import Image
    from timm.data import create_transform

    from trivit.datasets.transforms import DeviceTransform

    timm_transform = create_transform((len(config.mean), 32, 32), is_training=True, scale=tuple(config.scale),
                                      hflip=config.hflip, auto_augment=config.auto_augment,
                                      color_jitter=config.color_jitter or None, re_prob=1.0,
                                      interpolation=config.interpolation, mean=tuple(config.mean),
                                      std=tuple(config.std))
    split = train_transform(dataclasses.replace(config, re_prob=1.0), 32)
    device = DeviceTransform(config.mean, config.std, torch.device("cpu"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).convert(mode) for _ in range(24)]
    ours, pixels, boxes = [], [], []
    for seed, image in enumerate(images):
        with seeded_rng(seed):
            ours.append(timm_transform(image))
        with seeded_rng(seed):
            uint8, box = split(image)
        pixels.append(uint8)
        boxes.append(box)
    assert all(p.dtype == torch.uint8 for p in pixels)
    assert sum(int(b[2] > 0) for b in boxes) > 12, "random erasing acts on most images at re_prob 1.0"
    assert torch.equal(device(torch.stack(pixels), torch.stack(boxes)), torch.stack(ours))
