"""The process group: who this process is, and the few collectives the trainer itself needs.

Every launcher trivit supports (torchrun, accelerate launch, the deepspeed launcher) sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``srun`` with one task per GPU sets Slurm's own
(``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``), read when the others are absent,
with ``MASTER_ADDR`` / ``MASTER_PORT`` derived from the step's first node and the job id unless
given. A plain ``trivit train`` (also inside a batch script, outside ``srun``) is one process.
The group is created once, here, before any backend is built, with gloo on CPU and NCCL on
GPUs, and a timeout: a rank that dies or hangs makes the others fail with an error after
``engine.timeout_s`` instead of waiting forever.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trivit.datasets.loaders import start_worker_server


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env() -> World:
    """This process's place, from the launcher's environment variables (or an ``srun`` step's)."""
    env = os.environ
    if "RANK" not in env and "SLURM_STEP_NUM_TASKS" in env:
        return _world_from_slurm(env)
    world = World(_env_int(env, "RANK", 0), _env_int(env, "WORLD_SIZE", 1), _env_int(env, "LOCAL_RANK", 0))
    launcher = "start trivit through a launcher (torchrun, accelerate launch, deepspeed), see launch/README.md"
    if world.world_size < 1 or not 0 <= world.rank < world.world_size or world.local_rank < 0:
        raise ValueError(f"RANK={world.rank}, WORLD_SIZE={world.world_size}, LOCAL_RANK={world.local_rank} cannot be: "
                         f"ranks run from 0 to WORLD_SIZE - 1. Unset them for one process, or {launcher}")
    if world.distributed and "RANK" not in env:
        raise ValueError(f"WORLD_SIZE={world.world_size} but RANK is not set: this process does not know which rank "
                         f"it is, and would wait for the others until engine.timeout_s; {launcher}")
    if world.distributed and not {"MASTER_ADDR", "MASTER_PORT"} <= env.keys():
        raise ValueError(f"WORLD_SIZE={world.world_size} but MASTER_ADDR/MASTER_PORT are not set; {launcher}")
    return world


def _env_int(env: os._Environ | dict[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer; launchers set it (torchrun, accelerate launch, "
                         f"deepspeed): unset it to run one process") from None


def _world_from_slurm(env: os._Environ) -> World:
    """An ``srun`` task as a rank. Its place is exported as torchrun's variables too (Accelerate and
    DeepSpeed read those); ``MASTER_ADDR``/``MASTER_PORT`` are derived unless given: the step's
    first host, and 29000 + job id mod 1000."""
    world = World(_env_int(env, "SLURM_PROCID", 0), _env_int(env, "SLURM_STEP_NUM_TASKS", 1),
                  _env_int(env, "SLURM_LOCALID", 0))
    env.update(RANK=str(world.rank), WORLD_SIZE=str(world.world_size), LOCAL_RANK=str(world.local_rank))
    if world.distributed:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        env.setdefault("MASTER_ADDR", first_slurm_host(nodes) if nodes else env.get("SLURM_LAUNCH_NODE_IPADDR", ""))
        env.setdefault("MASTER_PORT", str(29000 + int(env.get("SLURM_JOB_ID", 0)) % 1000))
    return world


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[017-020,031],cpu1`` -> ``gpu017``."""
    match = re.match(r"([^,\[]+)(?:\[([^-,\]]+))?", nodelist)
    if not match:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}; set MASTER_ADDR to the first node's address")
    return match.group(1) + (match.group(2) or "")


def init_process_group(world: World, device: torch.device, timeout_s: float) -> None:
    """Make ``device`` this process's current GPU, then join the launcher's process group (no-op for
    one process or when already joined).

    The current device must be set first, for every backend: NCCL binds each rank's communicator
    to it (``device_id``), and FSDP2 and DeepSpeed take ``torch.cuda.current_device()``; left at
    its default, every rank of a node would use GPU 0. Joining also starts the loader workers'
    fork server where one is needed (:func:`trivit.datasets.loaders.worker_context`).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not world.distributed or dist.is_initialized():
        return
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=world.rank, world_size=world.world_size,
                            timeout=timedelta(seconds=timeout_s), device_id=device if cuda else None)
    start_worker_server()  # the group's threads can make forking loader workers unsafe


def sum_across_ranks(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` in place across ranks (``torch.distributed.all_reduce``) when a process group is up."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)


def sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (itself in one process)."""
    sum_across_ranks(tensor)
    return tensor


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any) -> Any:
    """The main rank's ``value`` on every rank (``value`` itself in one process)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` holds on every rank: a failure on one rank is seen by all, so none waits alone."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    return sum_tensor(flag).item() == 0


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
