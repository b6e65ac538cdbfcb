"""Validation over two real processes (gloo): every sample exactly once across ranks."""
from __future__ import annotations

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from trivit.datasets.config import DataConfig
from trivit.datasets.loaders import eval_loader
from trivit.datasets.stream import SampleDecoder, expand_urls
from trivit.datasets.transforms import eval_transform


def rank_main(rank: int, init_file: str, pattern: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    decode = SampleDecoder(eval_transform(DataConfig(mean=[0.3], std=[0.3], eval_crop_pct=1.0), 16), "L")
    ids = [i for batch in eval_loader(expand_urls(pattern), decode, batch_size=7, rank=rank, world_size=2,
                                      num_workers=2) for i in batch.ids.tolist()]
    gathered = [None, None]
    dist.all_gather_object(gathered, ids)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("shards, total", [("train-{000000..000004}.tar", 160), ("val-{000000..000001}.tar", 64)])
def test_two_ranks_of_two_workers_read_every_validation_sample_once(tiny_shards, tmp_path, shards, total):
    out = tmp_path / "ids.json"
    mp.start_processes(rank_main, args=(str(tmp_path / "init"), str(tiny_shards / shards), str(out)),
                       nprocs=2, start_method="spawn")
    per_rank = json.loads(out.read_text())
    every = per_rank[0] + per_rank[1]
    assert sorted(every) == list(range(total)), "no duplicates, none missed"
    shard_size = 32
    assert per_rank[0] and per_rank[1], "both ranks read samples"
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= shard_size, "ranks read within one shard of each other"
