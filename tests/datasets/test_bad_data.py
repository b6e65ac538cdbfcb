"""Bad data: corrupt images, missing fields, truncated and missing shards are skipped and counted."""
from __future__ import annotations

import pytest

from tests.conftest import synthetic_samples, tiny_overrides
from trivit.config import load
from trivit.datasets.config import DataConfig
from trivit.datasets.loaders import eval_loader
from trivit.datasets.shards import write_index, write_shard
from trivit.datasets.stream import SampleDecoder, expand_urls
from trivit.datasets.transforms import eval_transform
from trivit.engine.config import TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.trainer import Trainer


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """4 shards x 16: shard 1 holds a corrupt image, a sample without cls and one without id;
    shard 3 is cut in the middle of its data."""
    folder = tmp_path_factory.mktemp("bad")
    samples = list(synthetic_samples(64))
    samples[20]["png"] = b"\x89PNG garbage"
    del samples[21]["cls"]
    del samples[22]["id"]
    names = [f"train-{i:06d}.tar" for i in range(4)]
    for i, name in enumerate(names):
        write_shard(folder / name, samples[16 * i: 16 * (i + 1)])
    truncated = folder / names[3]
    truncated.write_bytes(truncated.read_bytes()[: 20_000])
    write_index(folder, {"train": {"shards": names, "counts": [16] * 4, "total": 64, "urls": "x"},
                         "val": {"shards": names[:1], "counts": [16], "total": 16, "urls": "x"}},
                [f"class{i}" for i in range(4)])
    return folder


def test_reader_skips_and_counts_every_kind_of_bad_data(bad_shards):
    urls = expand_urls(str(bad_shards / "train-{000000..000003}.tar")) + [str(bad_shards / "missing.tar")]
    decode = SampleDecoder(eval_transform(DataConfig(mean=[0.3], std=[0.3], eval_crop_pct=1.0), 16), "L")
    batches = list(eval_loader(urls, decode, batch_size=8, rank=0, world_size=1, num_workers=2))
    ids = {i for b in batches for i in b.ids.tolist()}
    assert set(range(48)) - {20, 21, 22} <= ids, "every intact sample of the intact shards"
    assert {20, 21, 22}.isdisjoint(ids)
    assert sum(b.skipped for b in batches) >= 3
    assert sum(b.bad_shards for b in batches) == 2, "the truncated shard and the missing one"


def run(bad_shards, tmp_path, **extra):
    overrides = tiny_overrides(bad_shards, tmp_path, **{
        "data.train_urls": str(bad_shards / "train-{000000..000003}.tar"),
        "data.val_urls": str(bad_shards / "train-000000.tar"), "data.batch_size": "8",
        "schedule.max_steps": "12", **extra})
    trainer = Trainer(load(TrainConfig, None, overrides))
    trainer.train()
    return trainer


def test_training_goes_on_and_logs_the_skipped_count(bad_shards, tmp_path):
    trainer = run(bad_shards, tmp_path / "run", **{"data.max_bad_fraction": "0.2"})
    assert trainer.step == 12
    records = read_metrics(tmp_path / "run")
    assert records[-1]["data/skipped"] >= 3 and records[-1]["data/bad_shards"] >= 1
    assert trainer.guard.data_counts["skipped"] == records[-1]["data/skipped"]


def test_too_much_bad_data_stops_with_a_clear_error(bad_shards, tmp_path):
    with pytest.raises(ValueError, match=r"training samples read so far are unreadable, more than data.max_bad_fraction=0.01"):
        run(bad_shards, tmp_path / "run", **{"data.max_bad_fraction": "0.01"})


@pytest.fixture(scope="module")
def one_corrupt_per_shard(tmp_path_factory):
    """8 shards x 32 samples, the 5th sample of each shard a corrupt PNG."""
    folder = tmp_path_factory.mktemp("corrupt_per_shard")
    samples = list(synthetic_samples(256))
    for shard in range(8):
        samples[32 * shard + 4]["png"] = b"\x89PNG not an image"
    names = [f"train-{i:06d}.tar" for i in range(8)]
    for i, name in enumerate(names):
        write_shard(folder / name, samples[32 * i: 32 * (i + 1)])
    split = {"shards": names, "counts": [32] * 8, "total": 256, "urls": "train-{000000..000007}.tar"}
    write_index(folder, {"train": split}, [f"class{i}" for i in range(4)])
    return folder


def test_resume_after_skipped_samples_continues_the_exact_stream(one_corrupt_per_shard, tmp_path):
    """Samples skipped before the checkpoint do not shift the resumed stream: the losses are identical."""
    common = {"data.train_urls": str(one_corrupt_per_shard / "train-{000000..000007}.tar"),
              "data.val_urls": str(one_corrupt_per_shard / "train-000000.tar"), "data.max_bad_fraction": "0.1",
              "schedule.max_steps": "16", "checkpoint.every_steps": "8"}
    run(one_corrupt_per_shard, tmp_path / "full", **common)
    run(one_corrupt_per_shard, tmp_path / "split", **dict(common, **{"schedule.max_steps": "8"}))
    at_checkpoint = {r["step"]: r for r in read_metrics(tmp_path / "split")}[8]
    assert at_checkpoint["data/skipped"] >= 2, "corrupt samples were read before the checkpoint"
    run(one_corrupt_per_shard, tmp_path / "split", **common)
    full = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    split = {r["step"]: r for r in read_metrics(tmp_path / "split")}
    assert [split[s]["loss"] for s in range(9, 17)] == [full[s]["loss"] for s in range(9, 17)]
    assert split[16]["data/skipped"] == full[16]["data/skipped"], "skipped samples are counted once"
