"""The example level's statistics merged across two real processes (gloo), no mocks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.sparse.test_examples import present
from trivit.sparse.examples import ExampleConfig, ExampleSelector, ExampleStats

NUM_SAMPLES = 20


def epoch_updates(epoch: int) -> tuple[list[bool], list[float]]:
    """Per sample id of this epoch: correctness and loss; samples change ranks between epochs."""
    generator = torch.Generator().manual_seed(epoch)
    correct = (torch.rand(NUM_SAMPLES, generator=generator) < 0.5).tolist()
    losses = torch.rand(NUM_SAMPLES, generator=generator).tolist()
    return correct, losses


def ids_of(rank: int, epoch: int) -> list[int]:
    half = list(range(10)) if (rank + epoch) % 2 == 0 else list(range(10, 20))
    return half


def feed(stats: ExampleStats, ids: list[int], epoch: int) -> None:
    correct, losses = epoch_updates(epoch)
    present(stats, ids, [correct[i] for i in ids], losses=[losses[i] for i in ids], variance=[0.01 * i for i in ids])


def rank_main(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    selector = ExampleSelector(ExampleConfig(policy="forgetting", refresh_every_epochs=2, remove_fraction=0.1),
                               NUM_SAMPLES, total_epochs=6, seed=0)
    plans = [selector.plan_epoch(0, dist.all_reduce).active]
    for epoch in range(1, 4):
        feed(selector.stats, ids_of(rank, epoch), epoch)
        plans.append(selector.plan_epoch(epoch, dist.all_reduce).active)
    torch.save({"stats": selector.stats.state_dict(), "plans": plans}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_hold_the_same_statistics_and_active_sets(tmp_path):
    mp.start_processes(rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key, table in results[0]["stats"].items():
        assert torch.equal(table, results[1]["stats"][key]), key
    assert all(torch.equal(a, b) for a, b in zip(results[0]["plans"], results[1]["plans"]))

    reference = ExampleSelector(ExampleConfig(policy="forgetting", refresh_every_epochs=2, remove_fraction=0.1),
                                NUM_SAMPLES, total_epochs=6, seed=0)
    expected_plans = [reference.plan_epoch(0, lambda t: None).active]
    for epoch in range(1, 4):
        feed(reference.stats, list(range(NUM_SAMPLES)), epoch)
        expected_plans.append(reference.plan_epoch(epoch, lambda t: None).active)
    for key in ("presentations", "correct", "forgetting", "last_correct", "loss", "attention_variance", "seen"):
        assert torch.equal(results[0]["stats"][key], reference.stats.state_dict()[key]), key
    assert all(torch.equal(a, b) for a, b in zip(results[0]["plans"], expected_plans))
