"""Everything a run resolves and checks before any process group exists.

:func:`resolve_run` turns a config and the launcher's environment into the concrete run (backend,
device, precision, micro-batch, shards, classes) and runs every start-up check that needs
neither GPUs nor peers, so the trainer, ``--dry-run`` and the tests of each launcher's
environment all meet the same errors at the same point.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from trivit.config import ConfigError
from trivit.datasets.checks import check_shards
from trivit.datasets.loaders import check_enough_shards
from trivit.datasets.sources import ShardSet, resolve_shards
from trivit.datasets.stream import StreamLayout
from trivit.engine.backends import resolve_engine
from trivit.engine.compile import check_backend
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World, world_from_env
from trivit.methods import check_composition

log = logging.getLogger(__name__)

PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each ``engine.precision`` (None: no autocast)."""

COMPILED_RAMP_LEVELS = 4
"""Keep rates below 1.0 on the ramp of a compiled run that leaves sparsity.schedule.levels null."""


@dataclass(frozen=True)
class RunSetup:
    config: TrainConfig
    """The config with a concrete backend (and ZeRO stage)."""
    world: World
    device: torch.device
    amp_dtype: torch.dtype | None
    """The mixed-precision dtype; None = fp32."""
    micro_batch: int
    """Images per rank per micro-batch."""
    shards: ShardSet
    num_classes: int

    def data_settings(self) -> dict[str, Any]:
        """What the data position depends on: a checkpoint must match it to resume."""
        config = self.config
        return {"train_samples": self.shards.train_samples, "num_workers": config.data.num_workers,
                "batch_size": config.data.batch_size, "seed": config.seed,
                "examples_policy": config.sparsity.examples.policy, "world_size": self.world.world_size,
                "grad_accum_steps": config.engine.grad_accum_steps, "classes": list(self.shards.classes),
                "index_fingerprint": self.shards.fingerprint()}

    def layout(self, epoch: int) -> StreamLayout:
        """How ``epoch``'s batches are laid out over this rank's slots and loader workers."""
        data = self.config.data
        return StreamLayout.for_rank(tuple(self.shards.train_urls), seed=self.config.seed, epoch=epoch,
                                     rank=self.world.rank, world_size=self.world.world_size,
                                     accum_steps=self.config.engine.grad_accum_steps, num_workers=data.num_workers,
                                     resampled=data.resampled)


def resolve_run(config: TrainConfig, world: World | None = None) -> RunSetup:
    """The concrete run of ``config`` in this process's environment; raises on any start-up problem."""
    world = world or world_from_env()
    check_composition(config)  # the methods it turns on combine (trivit/methods.py)
    config = resolve_engine(config, world)
    device, amp_dtype = resolve_device(config, world)
    config = resolve_compiled_path(with_precision(config, amp_dtype), device)
    if config.engine.backend == "deepspeed":
        from trivit.engine.backends.zero import deepspeed_config

        deepspeed_config(config, world)  # a disagreeing JSON is reported before any process waits for another
    data = config.data
    micro_batch = micro_batch_size(config, world)
    shards = resolve_shards(data)
    check_shards(shards, config.model.in_chans, config.model.img_size)
    if shards.train_samples < data.batch_size:
        raise ConfigError("data.batch_size", f"got {data.batch_size}, larger than the {shards.train_samples} "
                                             "training samples")
    num_classes = config.model.num_classes or len(shards.classes)
    if num_classes < len(shards.classes):
        raise ConfigError("model.num_classes", f"got {num_classes}, fewer than the {len(shards.classes)} classes of "
                                               f"the shard index; use null (the index's count) or at least "
                                               f"{len(shards.classes)}")
    setup = RunSetup(config, world, device, amp_dtype, micro_batch, shards, num_classes)
    log_launch(config, world, device)
    check_enough_shards(setup.layout(0))
    check_example_level(config, shards)
    if not shards.val_urls:
        log.warning("no validation shards (data.val_urls is empty): this run trains without evaluation")
    return setup


def log_launch(config: TrainConfig, world: World, device: torch.device) -> None:
    """Say how the run was launched: backend, processes, device, precision (and a launch that looks off)."""
    engine = config.engine
    if world.is_main:
        log.info("backend %s on %d process(es), %s, precision %s", engine.backend, world.world_size, device,
                 engine.precision)
    if world.is_main and config.optim.lr is not None:
        log.info("optim.lr=%g is the peak learning rate as given; optim.base_lr=%g (scaled by the global batch) is "
                 "not used", config.optim.lr, config.optim.base_lr)
    env = os.environ
    accelerate_gpus = "ACCELERATE_MIXED_PRECISION" in env and env.get("ACCELERATE_USE_CPU", "").lower() != "true"
    if world.is_main and world.distributed and device.type == "cpu" and accelerate_gpus:
        log.warning("an accelerate config for GPUs started %d processes, and no GPU is visible: they share this "
                    "machine's CPU cores (gloo). On a GPU node, check that the GPUs are visible (nvidia-smi, "
                    "CUDA_VISIBLE_DEVICES); on a CPU machine start the processes with torchrun --nproc-per-node N",
                    world.world_size)
    if not world.distributed and env.get("ACCELERATE_USE_CPU", "").lower() == "true":
        log.warning("accelerate launch --cpu started ONE process (it ignores --num_processes); for N processes on "
                    "the CPU use torchrun --nproc-per-node N or accelerate launch --multi_gpu --num_processes N")


def resolve_device(config: TrainConfig, world: World) -> tuple[torch.device, torch.dtype | None]:
    """The device (this rank's GPU under a launcher) and the mixed-precision dtype (None = fp32)."""
    engine = config.engine
    cuda = torch.cuda.is_available()
    if engine.device == "cuda" and not cuda:
        raise ConfigError("engine.device", "got 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    use_cuda = engine.device == "cuda" or (engine.device == "auto" and cuda)
    device = torch.device("cuda", world.local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    precision = resolve_precision(config, device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("engine.precision", "got 'fp16' on the CPU; use 'fp32' or 'bf16' there")
    return device, PRECISION_DTYPES[precision]


def resolve_precision(config: TrainConfig, device: torch.device) -> str:
    """``engine.precision`` made concrete: 'auto' is an accelerate config's mixed_precision if trivit was
    launched with one, else bf16 on a GPU that computes it natively (compute capability 8 and up), fp16
    with loss scaling on an older GPU (fp32 under FSDP, which has no scaler here), fp32 on the CPU.

    ``torch.cuda.is_bf16_supported()`` alone also counts emulated bf16 (V100, T4), which is slower than
    fp32 there: the capability decides."""
    precision = config.engine.precision
    if precision == "auto":
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "")
        precision = {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}.get(launched, "auto")
    if precision != "auto" or device.type != "cuda":
        return "fp32" if precision == "auto" else precision
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8 and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    fallback = "fp32" if config.engine.backend == "fsdp" else "fp16"
    log.warning("engine.precision=auto: %s (compute capability %d.%d) has no native bf16; training in %s%s",
                torch.cuda.get_device_name(device), major, minor, fallback,
                " (fsdp has no loss scaler for fp16 here)" if fallback == "fp32" else " with loss scaling")
    return fallback


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """The ``engine.precision`` name of an autocast dtype."""
    return next(name for name, dtype in PRECISION_DTYPES.items() if dtype == amp_dtype)


def with_precision(config: TrainConfig, amp_dtype: torch.dtype | None) -> TrainConfig:
    """``config`` with ``engine.precision`` the resolved one, which every backend reads (never 'auto')."""
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, precision=precision_name(amp_dtype)))


def resolve_compiled_path(config: TrainConfig, device: torch.device) -> TrainConfig:
    """``config`` with the attention kernel chosen and, for a compiled model, the keep-rate ramp quantised."""
    sparsity, engine = config.sparsity, config.engine
    schedule, attention = sparsity.schedule, sparsity.attention
    if engine.compile:
        check_backend(engine.compile_backend)
    if engine.compile and schedule.levels is None:
        schedule = dataclasses.replace(schedule, levels=COMPILED_RAMP_LEVELS)
        log.info("engine.compile: the keep-rate ramp takes %d rates below 1.0 (sparsity.schedule.levels), each "
                 "compiled once", COMPILED_RAMP_LEVELS)
    attn_drop = config.model.timm_kwargs.get("attn_drop_rate", 0.0)
    kernel = "sdpa" if attention.kernel == "auto" else attention.kernel
    if kernel == "flex":
        if device.type != "cuda":
            raise ConfigError("sparsity.attention.kernel", "got 'flex', but flex_attention has no backward on the "
                                                           "CPU; use 'sdpa' or 'auto'")
        if attn_drop:
            raise ConfigError("sparsity.attention.kernel", f"got 'flex', which has no attention dropout, with "
                                                           f"model.timm_kwargs.attn_drop_rate={attn_drop}; set it "
                                                           "to 0 or use 'sdpa'")
        if not engine.compile:
            log.warning("sparsity.attention.kernel=flex without engine.compile runs flex_attention unfused (slow)")
    sparsity = dataclasses.replace(sparsity, schedule=schedule,
                                   attention=dataclasses.replace(attention, kernel=kernel))
    return dataclasses.replace(config, sparsity=sparsity)


def micro_batch_size(config: TrainConfig, world: World) -> int:
    """Images per rank per micro-batch: the global batch over world size x accumulation steps."""
    data, engine = config.data, config.engine
    slots = world.world_size * engine.grad_accum_steps
    if data.batch_size % slots:
        raise ConfigError("data.batch_size", f"got {data.batch_size}, not divisible by world size {world.world_size} "
                                             f"x engine.grad_accum_steps {engine.grad_accum_steps} = {slots}; use a "
                                             f"multiple of {slots}")
    micro = data.batch_size // slots
    if (data.mixup > 0 or data.cutmix > 0) and micro % 2:
        raise ConfigError("data.batch_size", f"mixup/cutmix pair the images of each micro-batch, which has {micro} "
                                             f"(odd) here; use a global batch divisible by {2 * slots}")
    if config.model.dcal.pwca and micro < 2:
        raise ConfigError("model.dcal.pwca", f"PWCA pairs each image with another of its micro-batch, which has {micro} "
                                             f"here; use data.batch_size of at least {2 * slots}")
    return micro


def check_example_level(config: TrainConfig, shards: ShardSet) -> None:
    """The example level keeps one table entry per sample id and sizes epochs from its active ids."""
    examples = config.sparsity.examples
    if examples.policy == "none":
        return
    if shards.num_ids != shards.train_samples:
        raise ConfigError("sparsity.examples.policy", f"the example level needs every shard of the splits it reads, "
                                                      f"but data.train_urls lists {shards.train_samples} of their "
                                                      f"{shards.num_ids} samples; list all their shards or set "
                                                      "sparsity.examples.policy=none")
    removed = round(examples.initial_remove_fraction * shards.num_ids) if examples.policy == "forgetting" else 0
    check_epoch_length(config, shards.num_ids - removed, epoch=0)


def check_epoch_length(config: TrainConfig, active: int, epoch: int) -> None:
    """An epoch must hold at least one global batch of active samples."""
    batch, examples = config.data.batch_size, config.sparsity.examples
    if active < batch:
        raise ConfigError("sparsity.examples", f"epoch {epoch} would train on {active} active samples, fewer than one "
                                               f"global batch of {batch}: the example level (policy "
                                               f"{examples.policy!r}, initial_remove_fraction "
                                               f"{examples.initial_remove_fraction}, prune_ratio {examples.prune_ratio}) "
                                               "leaves too few; lower those fractions or data.batch_size")
