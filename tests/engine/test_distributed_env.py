"""Where each rank runs: its GPU, chosen before the process group exists, and its place from the launcher."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trivit.engine import distributed
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World, init_process_group, world_from_env
from trivit.engine.trainer import resolve_device


def test_each_rank_takes_its_local_gpu_before_joining_the_group(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw["device_id"])))
    world = World(rank=13, world_size=32, local_rank=5)
    device, _ = resolve_device(TrainConfig(), world)
    assert device == torch.device("cuda", 5)
    init_process_group(world, device, 60)
    assert calls == [("set_device", torch.device("cuda", 5)), ("init", "nccl", torch.device("cuda", 5))]


def test_slurm_srun_tasks_are_ranks(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    slurm = {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_STEP_NUM_TASKS": "32", "SLURM_JOB_ID": "4242",
             "SLURM_STEP_NODELIST": "gpu[017-020]", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.9"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert world_from_env() == World(rank=13, world_size=32, local_rank=5)
    assert [distributed.os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")] == ["13", "32", "5"]
    assert distributed.os.environ["MASTER_ADDR"] == "gpu017" and distributed.os.environ["MASTER_PORT"] == "29242"
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("RANK")
    world_from_env()
    assert distributed.os.environ["MASTER_ADDR"] == "10.0.0.1", "given values win"


def test_a_batch_script_outside_srun_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "32")
    assert world_from_env() == World()


@pytest.mark.parametrize("nodelist, first", [("gpu017", "gpu017"), ("gpu[017-020,031]", "gpu017"),
                                            ("a1,b[2-3]", "a1"), ("node-[0007-0009]", "node-0007")])
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first
