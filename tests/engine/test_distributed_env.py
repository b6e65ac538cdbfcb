"""Where each rank runs: its GPU, chosen before the process group exists, and its place from the launcher."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trivit.engine import distributed
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World, init_process_group, world_from_env
from trivit.engine.startup import resolve_device


def test_each_rank_takes_its_local_gpu_before_joining_the_group(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw["device_id"])))
    world = World(rank=13, world_size=32, local_rank=5)
    device, _ = resolve_device(TrainConfig(), world)
    assert device == torch.device("cuda", 5)
    init_process_group(world, device, 60)
    assert calls == [("set_device", torch.device("cuda", 5)), ("init", "nccl", torch.device("cuda", 5))]


def test_slurm_srun_tasks_are_ranks(monkeypatch):
    env = {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_STEP_NUM_TASKS": "32", "SLURM_JOB_ID": "4242",
           "SLURM_STEP_NODELIST": "gpu[017-020]", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.9"}
    monkeypatch.setattr(distributed.os, "environ", env)
    assert world_from_env() == World(rank=13, world_size=32, local_rank=5)
    assert [env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")] == ["13", "32", "5"], "for Accelerate, DeepSpeed"
    assert env["MASTER_ADDR"] == "gpu017" and env["MASTER_PORT"] == "29242"
    given = {**{k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
             "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    monkeypatch.setattr(distributed.os, "environ", given)
    world_from_env()
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.1", "29500"), "given values win"


def test_a_batch_script_outside_srun_is_one_process(monkeypatch):
    monkeypatch.setattr(distributed.os, "environ", {"SLURM_PROCID": "0", "SLURM_NTASKS": "32", "SLURM_JOB_ID": "1"})
    assert world_from_env() == World()


@pytest.mark.parametrize("nodelist, first", [("gpu017", "gpu017"), ("gpu[017-020,031]", "gpu017"),
                                            ("a1,b[2-3]", "a1"), ("node-[0007-0009]", "node-0007")])
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def resume_rank(rank: int, init_file: str, folders: list[str], unreadable_on_rank_1: bool, out: str) -> None:
    import json

    from trivit.engine.state import checkpoint

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == 1 and unreadable_on_rank_1:
        def refuse(folder):
            raise PermissionError(f"[Errno 13] Permission denied: '{folder}/trainer.pt'")
        checkpoint.load_trainer_state = refuse  # a node that cannot read the shared run_dir
    try:
        found = checkpoint.agreed_resume(checkpoint.CheckpointManager(folders[rank], keep=3).load_latest,
                                         is_main=rank == 0)
        result = {"step": found[0]["step"] if found else None}
    except ValueError as error:
        result = {"error": str(error)}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("unreadable_on_rank_1", [False, True])
def test_the_main_rank_chooses_the_checkpoint_and_every_rank_reads_that_one(tmp_path, unreadable_on_rank_1):
    import json
    import shutil

    import torch.multiprocessing as mp

    shared = tmp_path / "a"
    for step in (4, 8):
        folder = shared / f"step_{step:08d}"
        folder.mkdir(parents=True)
        torch.save({"step": step, "backend": "single", "model_name": "m", "ranks": []}, folder / "trainer.pt")
    own = tmp_path / "b"  # what rank 1 would find on its own: its newest readable checkpoint is step 4
    shutil.copytree(shared, own)
    (own / "step_00000008" / "trainer.pt").write_bytes(b"garbage")
    out = str(tmp_path / "result")
    mp.start_processes(resume_rank, args=(str(tmp_path / "init"), [str(shared), str(own)], unreadable_on_rank_1, out),
                       nprocs=2, start_method="spawn")
    results = [json.loads(open(f"{out}.{rank}").read()) for rank in (0, 1)]
    if not unreadable_on_rank_1:
        assert results == [{"step": 8}, {"step": 8}], "rank 1 reads the main rank's choice, not its own"
    else:
        for result in results:
            assert result["error"].startswith(f"rank 1 cannot read checkpoint {shared / 'step_00000008'}")
            assert "Permission denied" in result["error"] and "every rank must see the same run_dir" in result["error"]
