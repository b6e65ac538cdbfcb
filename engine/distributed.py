"""The process group: who this process is, and the few collectives the trainer itself needs.

Every launcher trivit supports (torchrun, accelerate launch, the deepspeed launcher, srun
through them) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``trivit train`` sets
none and is one process. The group is created once, here, before any backend is built, with
gloo on CPU and NCCL on GPUs, and a timeout: a rank that dies or hangs makes the others fail
with an error after ``engine.timeout_s`` instead of waiting forever.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trivit.sparse.examples import sum_across_ranks


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
    """This process's place, from the launcher's environment variables."""
    env = os.environ
    world = World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    if world.distributed and not {"MASTER_ADDR", "MASTER_PORT"} <= env.keys():
        raise ValueError(f"WORLD_SIZE={world.world_size} but MASTER_ADDR/MASTER_PORT are not set; start trivit "
                         "through a launcher (torchrun, accelerate launch, deepspeed), see launch/README.md")
    return world


def init_process_group(world: World, device: torch.device, timeout_s: float) -> None:
    """Join the launcher's process group (no-op for one process or when already joined)."""
    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size,
                            timeout=timedelta(seconds=timeout_s))


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
