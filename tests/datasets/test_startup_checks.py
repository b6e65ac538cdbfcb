"""Start-up checks on the shards: each bad layout fails before training, naming the fix."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from tests.conftest import tiny_overrides
from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.trainer import Trainer


@pytest.fixture
def shard_copy(tiny_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    return folder


def epoch_loader(trainer: Trainer):
    """The trainer's loader for this rank's rest of the current epoch, as the loop builds it."""
    return trainer.data.loader(*trainer._epoch_reading())


def build(shards, tmp_path, **extra):
    return Trainer(load(TrainConfig, None, tiny_overrides(shards, tmp_path / "run", **extra)))


@pytest.mark.parametrize("change, extra, error, message", [
    (None, {"data.train_urls": "/nonexistent/train-{000000..000003}.tar"}, FileNotFoundError,
     "no shard matches data.train_urls='/nonexistent/train-{000000..000003}.tar'"),
    (None, {"data.train_urls": "{folder}/train-{000000..000009}.tar"}, FileNotFoundError,
     "2 of the 10 shards of data.train_urls do not exist (first: {folder}/train-000008.tar)"),
    ("delete-last", {"data.train_urls": "{folder}/train-{000000..000006}.tar"}, FileNotFoundError,
     "the index lists 1 train shards that are missing from {folder} (first: train-000007.tar)"),
    ("extra-shard", {"data.train_urls": "{folder}/train-{000000..000008}.tar"}, ValueError,
     "1 training shards are not in the index (first: {folder}/train-000008.tar)"),
    ("no-index", {}, FileNotFoundError, "index.json' not found"),
    (None, {"data.val_urls": "{folder}/val-{000000..000005}.tar"}, FileNotFoundError,
     "4 of the 6 shards of data.val_urls do not exist"),
])
def test_bad_shard_layouts_fail_at_start_up(shard_copy, tmp_path, change, extra, error, message):
    if change == "delete-last":
        (shard_copy / "train-000007.tar").unlink()
    elif change == "extra-shard":
        shutil.copy(shard_copy / "train-000000.tar", shard_copy / "train-000008.tar")
    elif change == "no-index":
        (shard_copy / "index.json").unlink()
    extra = {k: v.replace("{folder}", str(shard_copy)) for k, v in extra.items()}
    with pytest.raises(error) as raised:
        build(shard_copy, tmp_path, **extra)
    assert message.replace("{folder}", str(shard_copy)) in str(raised.value)


def test_more_workers_than_shards_explains_the_hang_it_avoids(tiny_shards, tmp_path):
    with pytest.raises(ValueError, match=r"8 training shards for 1 data-parallel slots \(ranks x gradient accumulation "
                                         r"steps\) x 9 workers: every worker needs at least one shard, or it would "
                                         r"yield nothing and the ranks would hang"):
        build(tiny_shards, tmp_path, **{"data.num_workers": "9"})


def test_loaders_pin_memory_when_training_on_cuda(tiny_shards, tmp_path):
    trainer = build(tiny_shards, tmp_path)
    assert epoch_loader(trainer).pin_memory is False, "the CPU has no use for pinned pages"
    # where the loaders are made, the run's device is all that counts
    trainer.data.setup = dataclasses.replace(trainer.setup, device=torch.device("cuda"))
    assert epoch_loader(trainer).pin_memory is True


def test_pipe_urls_stream_through_a_command(tiny_shards, tmp_path):
    trainer = build(tiny_shards, tmp_path, **{
        "data.train_urls": f"pipe:cat {tiny_shards}/train-{{000000..000007}}.tar",
        "data.index": str(tiny_shards / "index.json"), "schedule.max_steps": "20"})
    trainer.train()
    assert trainer.step == 20 and trainer.shards.train_samples == 256
    assert read_metrics(tmp_path / "run")[-1]["data/skipped"] == 0


@pytest.fixture(scope="module")
def second_source(tmp_path_factory):
    """A shard set written on its own (ids from 0 again, same file names): 2 shards x 48 samples."""
    from tests.conftest import NUM_CLASSES, synthetic_samples
    from trivit.datasets.shards import write_index, write_split

    folder = tmp_path_factory.mktemp("second_source")
    write_index(folder, {"train": write_split(synthetic_samples(96, seed=3), folder, "train", 48)},
                [f"class{i}" for i in range(NUM_CLASSES)])
    return folder


def test_joined_sources_get_distinct_ids_and_one_table(tiny_shards, second_source, tmp_path):
    joined = f"{tiny_shards}/train-{{000000..000007}}.tar::{second_source}/train-{{000000..000001}}.tar"
    trainer = build(tiny_shards, tmp_path, **{"data.train_urls": joined, "sparsity.examples.policy": "forgetting",
                                               "data.batch_size": "32"})
    assert trainer.shards.train_samples == 256 + 96, "each source's counts from its own index"
    selector = trainer.planner.selector
    assert trainer.shards.num_ids == len(selector.in_pool) == len(selector.stats.correct) == 352
    ids = [i for batch in epoch_loader(trainer) for i in batch.ids.tolist()]
    assert len(ids) == len(set(ids)) == trainer.epochs.lengths[-1] * 32, "no id is read twice in an epoch"
    assert all(trainer.planner.plan.active[i] for i in ids), "only active samples are read"
    assert any(i >= 256 for i in ids), "the second source's ids come after the first's"


def test_joined_sources_with_other_classes_are_refused(tiny_shards, tmp_path):
    from tests.conftest import synthetic_samples
    from trivit.datasets.shards import write_index, write_split

    other = tmp_path / "other"
    write_index(other, {"train": write_split(synthetic_samples(32), other, "train", 32)}, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="has other classes than .*joined sources must share one class list"):
        build(tiny_shards, tmp_path, **{"data.train_urls": f"{tiny_shards}/train-000000.tar::{other}/train-000000.tar"})


def test_a_subset_of_the_shards_trains_and_the_example_level_asks_for_all(tiny_shards, tmp_path):
    subset = {"data.train_urls": f"{tiny_shards}/train-{{000000..000004}}.tar", "schedule.max_steps": "12"}
    trainer = build(tiny_shards, tmp_path, **subset)
    trainer.train()
    assert trainer.shards.train_samples == 160 and trainer.shards.num_ids == 256
    assert trainer.epochs.lengths[0] == 160 // 16, "the epoch is the listed shards' samples"
    with pytest.raises(ValueError, match=r"lists 160 of their 256 samples; list all their shards or set "
                                         r"sparsity.examples.policy=none"):
        build(tiny_shards, tmp_path / "examples", **subset, **{"sparsity.examples.policy": "forgetting"})


def test_a_shard_folder_is_read_through_its_index(tiny_shards, tmp_path):
    """The recipes name the folder `trivit shards` wrote: no shard count to type (and get wrong)."""
    trainer = build(tiny_shards, tmp_path, **{"data.train_urls": str(tiny_shards), "data.val_urls": str(tiny_shards)})
    assert trainer.shards.train_samples == 256 and len(trainer.shards.train_urls) == 8
    assert [url.rsplit("/", 1)[-1] for url in trainer.shards.val_urls] == ["val-000000.tar", "val-000001.tar"]
