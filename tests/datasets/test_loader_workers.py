"""How loader workers start: forked, or from a fork server on a CPython whose fork can deadlock."""
from __future__ import annotations

import multiprocessing

import pytest
import torch

from tests.datasets.test_stream import CONFIG
from trivit.datasets import loaders
from trivit.datasets.loaders import WORKER_SERVER_PRELOAD, forking_can_deadlock, train_loader, worker_context
from trivit.datasets.stream import SampleDecoder, StreamLayout, expand_urls
from trivit.datasets.transforms import train_transform


@pytest.mark.parametrize("version, affected", [((3, 10, 14), True), ((3, 11, 7), True), ((3, 11, 8), False),
                                               ((3, 12, 0), True), ((3, 12, 1), False), ((3, 13, 0), False)])
def test_the_pythons_with_the_fork_deadlock(version, affected):
    assert forking_can_deadlock(version) is affected


def test_without_a_process_group_workers_are_forked():
    assert not torch.distributed.is_initialized()
    assert worker_context().get_start_method() == "fork"


def test_fork_server_workers_read_the_same_batches_as_forked_ones(tiny_shards, monkeypatch):
    """The stream, its decoder and the SIGTERM hand-off pickle; augmentation draws stay per worker."""
    urls = expand_urls(str(tiny_shards / "train-{000000..000007}.tar"))
    layout = StreamLayout.for_rank(tuple(urls), seed=5, epoch=1, rank=0, world_size=1, num_workers=2)
    decode = SampleDecoder(train_transform(CONFIG, 16), "L")

    def read() -> list:
        loader = train_loader(layout, decode, batch_size=8, start=2, stop=9, shuffle_buffer=8, num_workers=2)
        with loader.batches() as batches:
            return [loader.multiprocessing_context.get_start_method(), *batches]

    forked = read()
    server = multiprocessing.get_context("forkserver")
    server.set_forkserver_preload(WORKER_SERVER_PRELOAD)
    monkeypatch.setattr(loaders, "worker_context", lambda: server)
    served = read()
    assert forked[0] == "fork" and served[0] == "forkserver"
    assert len(forked) == len(served) == 8
    for a, b in zip(forked[1:], served[1:]):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
