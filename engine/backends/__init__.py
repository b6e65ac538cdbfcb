"""Training backends: one process or DDP (Accelerate), FSDP2, DeepSpeed ZeRO 1/2/3."""
from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

import torch

from trivit.config import ConfigError
from trivit.engine.backends.base import Backend
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World

BACKENDS = {
    "single": ("accelerate_ddp", "AccelerateBackend"),
    "ddp": ("accelerate_ddp", "AccelerateBackend"),
    "fsdp": ("fsdp", "FSDPBackend"),
    "deepspeed": ("zero", "DeepSpeedBackend"),
}


def _module(name: str):
    """A backend's module, imported on first use (a run never pays for the backends it does not use)."""
    return importlib.import_module(f"trivit.engine.backends.{BACKENDS[name][0]}")


def launcher_backend() -> str | None:
    """The backend an ``accelerate launch`` config asked for, if any."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return None


def resolve_engine(config: TrainConfig, world: World) -> TrainConfig:
    """``config`` with a concrete backend (and ZeRO stage), taken from the launcher where the config
    leaves it open ('auto' / null) and checked against the launcher where it does not."""
    engine = config.engine
    launched = launcher_backend()
    name = engine.backend
    if name == "auto":
        name = launched or ("ddp" if world.distributed else "single")
    elif launched is not None and launched != name:
        raise ConfigError("engine.backend", f"got {name!r} but the accelerate config that launched trivit asks for "
                                            f"{launched!r}; make them agree (or use engine.backend=auto)")
    if name == "single" and world.distributed:
        raise ConfigError("engine.backend", f"got 'single' but the launcher started {world.world_size} processes; "
                                            "use 'ddp', 'fsdp', 'deepspeed' or 'auto'")
    if name in ("ddp", "fsdp") and not world.distributed:
        raise ConfigError("engine.backend", f"got {name!r} but this is a single process (WORLD_SIZE unset or 1). "
                                            "Start N processes with 'torchrun --nproc-per-node N -m trivit train ...' "
                                            "or 'accelerate launch --multi_gpu --num_processes N'; note that "
                                            "'accelerate launch --cpu' starts one process whatever --num_processes says")
    updates: dict[str, Any] = {"backend": name}
    if name == "deepspeed":
        if not world.distributed and "MASTER_ADDR" not in os.environ:
            raise ConfigError("engine.backend", "got 'deepspeed' without a distributed environment (RANK, WORLD_SIZE, "
                                                "MASTER_ADDR, MASTER_PORT); start it with the deepspeed launcher, "
                                                "torchrun or accelerate launch (see launch/README.md)")
        from trivit.engine.backends.zero import resolve_zero_settings

        updates.update(resolve_zero_settings(config))
    config = dataclasses.replace(config, engine=dataclasses.replace(engine, **updates))
    _check_supported(config, world)
    return config


def _check_supported(config: TrainConfig, world: World) -> None:
    engine, ema, name = config.engine, config.optim.ema_decay, config.engine.backend
    deepspeed_keys = [key for key, value in (("engine.zero_stage", engine.zero_stage),
                                             ("engine.deepspeed_config", engine.deepspeed_config),
                                             ("engine.deepspeed_options", engine.deepspeed_options)) if value]
    if name != "deepspeed" and deepspeed_keys:
        raise ConfigError(deepspeed_keys[0], f"is set but the backend is {name!r}, which would ignore it; remove "
                                             f"{' and '.join(deepspeed_keys)}, or set engine.backend=deepspeed")
    sharded = name == "fsdp" or (name == "deepspeed" and engine.zero_stage == 3)
    if ema is not None and sharded:
        raise ConfigError("optim.ema_decay", f"an EMA of the weights needs the whole model on every rank, which "
                                             f"{name} (sharded parameters) does not keep; set optim.ema_decay=null "
                                             "or use ddp / deepspeed with engine.zero_stage 1 or 2")
    if name == "fsdp" and engine.precision == "fp16":
        raise ConfigError("engine.precision", "fsdp trains in bf16 or fp32 here; fp16 needs a loss scaler per "
                                              "shard: use 'bf16'")
    if name == "deepspeed":  # its JSON is checked once the precision is resolved (engine/startup.py)
        if engine.nonfinite_loss == "skip" and engine.grad_accum_steps > 1:
            raise ConfigError("engine.nonfinite_loss", "'skip' with deepspeed needs engine.grad_accum_steps=1 (a "
                                                       "DeepSpeed engine cannot drop a half-accumulated step); use "
                                                       "'stop' or no accumulation")


def build_backend(config: TrainConfig, world: World, device: torch.device, amp_dtype: torch.dtype | None) -> Backend:
    """The backend of a config resolved by :func:`resolve_engine`."""
    name = config.engine.backend
    backend = getattr(_module(name), BACKENDS[name][1])(config, world, device, amp_dtype)
    backend.name = name
    return backend


def export_weights(name: str, folder: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole model's weights from checkpoint ``folder`` written by backend ``name``, in one process."""
    return _module(name).export_weights(folder, state)
