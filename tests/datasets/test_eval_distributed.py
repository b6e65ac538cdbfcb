"""Validation over two real processes (gloo): every sample exactly once across ranks."""
from __future__ import annotations

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from trivit.datasets.config import DataConfig
from trivit.datasets.loaders import eval_loader
from trivit.datasets.stream import SampleDecoder, eval_share, expand_urls
from trivit.datasets.transforms import eval_transform

PATTERNS = {"train-{000000..000004}.tar": 160, "val-{000000..000001}.tar": 64}
"""An odd number of shards (one rank reads more) and an even one."""


def rank_main(rank: int, init_file: str, folder: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    decode = SampleDecoder(eval_transform(DataConfig(mean=[0.3], std=[0.3], eval_crop_pct=1.0), 16), "L")
    read = {}
    for pattern in PATTERNS:
        ids = [i for batch in eval_loader(expand_urls(f"{folder}/{pattern}"), decode, batch_size=7, rank=rank,
                                          world_size=2, num_workers=2) for i in batch.ids.tolist()]
        gathered = [None, None]
        dist.all_gather_object(gathered, ids)
        read[pattern] = gathered
    if rank == 0:
        with open(out, "w") as f:
            json.dump(read, f)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_of_two_workers_read_every_validation_sample_once(tiny_shards, tmp_path):
    out = tmp_path / "ids.json"
    mp.start_processes(rank_main, args=(str(tmp_path / "init"), str(tiny_shards), str(out)),
                       nprocs=2, start_method="spawn")
    for pattern, per_rank in json.loads(out.read_text()).items():
        every = per_rank[0] + per_rank[1]
        assert sorted(every) == list(range(PATTERNS[pattern])), f"{pattern}: no duplicates, none missed"
        shard_size = 32
        assert per_rank[0] and per_rank[1], f"{pattern}: both ranks read samples"
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= shard_size, f"{pattern}: within one shard of each other"


@pytest.mark.parametrize("shards, readers", [(2, 8), (3, 4), (5, 2), (4, 4), (1, 3)])
def test_every_reader_gets_a_share_and_every_sample_is_read_once(shards, readers):
    """Readers (ranks x workers) split the validation shards whole when there are enough, and by sample within a
    shard when there are fewer: every reader decodes something, no sample twice, none missed."""
    urls = [f"val-{s}.tar" for s in range(shards)]
    per_shard = 10
    read = []
    for reader in range(readers):
        mine, member, group = eval_share(urls, reader, readers)
        read.append([(url, i) for url in mine for i in range(per_shard) if i % group == member])
    every = sorted(item for items in read for item in items)
    assert every == sorted((url, i) for url in urls for i in range(per_shard))
    assert all(read), "no reader is left without samples"
    sizes = [len(items) for items in read]
    assert max(sizes) - min(sizes) <= per_shard


def test_four_ranks_over_two_shards_each_decode_a_quarter(tiny_shards):
    decode = SampleDecoder(eval_transform(DataConfig(mean=[0.3], std=[0.3], eval_crop_pct=1.0), 16), "L")
    urls = expand_urls(f"{tiny_shards}/val-{{000000..000001}}.tar")
    per_rank = [[i for batch in eval_loader(urls, decode, batch_size=5, rank=rank, world_size=4, num_workers=0)
                 for i in batch.ids.tolist()] for rank in range(4)]
    assert sorted(i for ids in per_rank for i in ids) == list(range(64))
    assert [len(ids) for ids in per_rank] == [16, 16, 16, 16]
