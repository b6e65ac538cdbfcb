"""DeepSpeed ZeRO 1/2/3: a DeepSpeed engine around the model and trivit's torch optimizer.

DeepSpeed receives the torch AdamW that trivit builds (its fused Adam takes minutes to
JIT-build on CPU and is not needed); the learning rate stays with trivit's schedule, which
writes it into that optimizer's param groups. DeepSpeed's own checkpoint format is used;
``export_weights`` consolidates it offline with DeepSpeed's ``zero_to_fp32``.
"""
from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trivit.config import ConfigError, merge
from trivit.engine.backends.base import Backend, NamedGradients, OptimizerFactory
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World

TAG = "deepspeed"


def read_json(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"engine.deepspeed_config: no such file {path!r}; see launch/deepspeed/") from None
    except json.JSONDecodeError as error:
        raise ConfigError("engine.deepspeed_config", f"{path} is not valid JSON ({error})") from None


def resolve_zero_settings(config: TrainConfig) -> dict[str, Any]:
    """``engine.deepspeed_config``, ``engine.zero_stage`` and ``engine.precision`` where the config
    leaves them open: the JSON from an ``accelerate launch`` DeepSpeed config (its environment); the
    stage from there, else the JSON's, else 2; the precision the JSON enables."""
    env = os.environ
    engine = config.engine
    path = engine.deepspeed_config
    if path is None and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() != "none":
        path = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    stage = engine.zero_stage
    launched = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None and launched is not None:
        stage = int(launched)
    elif stage is not None and launched is not None and int(launched) != stage:
        raise ConfigError("engine.zero_stage", f"got {stage} but the accelerate config that launched trivit asks for "
                                               f"ZeRO stage {launched}; make them agree (or leave engine.zero_stage null)")
    written = merge(read_json(path) if path else {}, engine.deepspeed_options)
    if stage is None:
        stage = written.get("zero_optimization", {}).get("stage")
        stage = stage if stage in (1, 2, 3) else 2
    settings = {"deepspeed_config": path, "zero_stage": stage}
    if engine.precision == "auto":
        for precision in ("bf16", "fp16"):
            if written.get(precision, {}).get("enabled") is True:
                settings["precision"] = precision
    return settings


def deepspeed_config(config: TrainConfig, world: World) -> dict[str, Any]:
    """The DeepSpeed config: ``engine.deepspeed_config`` with its "auto" values and trivit's own filled in.

    Values the JSON states explicitly must agree with trivit's config; a disagreement is an error
    naming both, never a silent choice of one.
    """
    engine = config.engine
    path = engine.deepspeed_config
    ds = merge(read_json(path) if path is not None else {}, engine.deepspeed_options)
    global_batch = config.data.batch_size
    micro = global_batch // (world.world_size * engine.grad_accum_steps)
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(engine.precision)
    wanted = {
        ("train_batch_size",): global_batch,
        ("train_micro_batch_size_per_gpu",): micro,
        ("gradient_accumulation_steps",): engine.grad_accum_steps,
        ("gradient_clipping",): config.optim.clip_grad or 0.0,
        ("zero_optimization", "stage"): engine.zero_stage,
        ("bf16", "enabled"): precision == "bf16",
        ("fp16", "enabled"): precision == "fp16",
    }
    for keys, value in wanted.items():
        section = ds
        for key in keys[:-1]:
            section = section.setdefault(key, {})
        given = section.get(keys[-1], "auto")
        if given != "auto" and given != value:
            source = path or "engine.deepspeed_options"
            raise ConfigError("engine.deepspeed_config",
                              f"{source} sets {'.'.join(keys)}={given!r} but this run needs {value!r} (from data.batch_size, "
                              "engine.grad_accum_steps, the world size, optim.clip_grad, engine.zero_stage and "
                              "engine.precision); set it to \"auto\" or change the trivit config")
        section[keys[-1]] = value
    ds.setdefault("zero_allow_untested_optimizer", True)  # trivit hands DeepSpeed a torch optimizer
    ds.setdefault("steps_per_print", 10**9)
    check_deepspeed_keys(ds, path or "engine.deepspeed_options")
    return ds


SECTIONS = ("zero_optimization", "activation_checkpointing", "flops_profiler", "comms_logger", "monitor",
            "tensorboard", "wandb", "csv_monitor", "compression_training", "data_efficiency", "aio", "elasticity",
            "autotuning", "pipeline", "amp", "sparse_gradients", "curriculum_learning", "nebula", "hybrid_engine",
            "eigenvalue", "progressive_layer_drop", "weight_quantization", "sparse_attention", "quantize_training",
            "compile", "timers", "checkpoint", "data_types", "optimizer", "scheduler")
"""DeepSpeed's config sections (its constants module names the scalar keys)."""


def check_deepspeed_keys(ds: dict[str, Any], source: str) -> None:
    """DeepSpeed ignores an unknown top-level key and rejects an unknown ZeRO key deep inside its start-up:
    both are named here, with the closest DeepSpeed option."""
    import difflib

    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    known = {value for name, value in vars(constants).items() if name.isupper() and isinstance(value, str)}
    known.update(SECTIONS)
    zero_known = set(DeepSpeedZeroConfig.model_fields) | {f.alias for f in DeepSpeedZeroConfig.model_fields.values()
                                                            if f.alias}
    unknown = [(key, known) for key in ds if key not in known]
    unknown += [(f"zero_optimization.{key}", {f"zero_optimization.{k}" for k in zero_known})
                for key in ds.get("zero_optimization", {}) if key not in zero_known]
    if unknown:
        key, candidates = unknown[0]
        close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.6)
        raise ConfigError("engine.deepspeed_options" if source == "engine.deepspeed_options" else "engine.deepspeed_config",
                          f"{source} sets {key!r}, which DeepSpeed does not know"
                          + (f" (did you mean {close[0]!r}?)" if close else "") + "; DeepSpeed would ignore it or stop "
                          "deep in its start-up")


class DeepSpeedBackend(Backend):
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo", verbose=False)
        self.optimizer = make_optimizer(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                    config=deepspeed_config(self.config, self.world))
        if self.config.engine.compile:
            self.engine.compile(backend=self.config.engine.compile_backend, compile_kwargs={"dynamic": False})
        self.model = self.engine
        self.module = self.engine.module

    def autocast(self) -> AbstractContextManager:
        """DeepSpeed keeps the model in the training dtype itself (its bf16/fp16 modes)."""
        return nullcontext()

    def prepare_inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, dtype=self.amp_dtype or torch.float32, non_blocking=True)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        # trivit already divides each micro-batch's loss by the rank's whole batch
        self.engine.backward(loss, scale_wrt_gas=False)
        if last_micro_batch:
            self._report_gradients()
        self.engine.step()  # reduces and updates at the accumulation boundary only

    def step(self) -> None:
        """Done inside :meth:`backward` at the accumulation boundary (DeepSpeed's contract)."""

    def zero_grad(self) -> None:
        """DeepSpeed zeroes the gradients after its own step."""

    def zero_entries(self, entries: dict[str, torch.Tensor]) -> None:
        """Through DeepSpeed's whole-tensor accessors: the fp32 master weights (the model's copy follows
        at the next step) and Adam's moments."""
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        optimizer = self.engine.optimizer
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 link the parameters to Adam's state once, after the first parameter group's first
            # step, when the other groups have no state yet: link them again now that all have it
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()
        for name, param in self.module.named_parameters():
            if name not in entries:
                continue
            mask = entries[name].to(param.device)
            safe_set_full_fp32_param(param, safe_get_full_fp32_param(param).masked_fill(mask, 0))
            for key in ("exp_avg", "exp_avg_sq"):
                state = safe_get_full_optimizer_state(param, key)
                if state is not None:
                    safe_set_full_optimizer_state(param, state.masked_fill(mask, 0), key)

    def named_gradients(self) -> NamedGradients:
        """The fp32 master weights and gradients, gathered from the ZeRO partitions."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        for name, param in self.module.named_parameters():
            yield name, safe_get_full_fp32_param(param), safe_get_full_grad(param)

    def save(self, folder: Path) -> dict[str, Any]:
        self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False)
        return {"zero_stage": self.config.engine.zero_stage}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        if state["zero_stage"] != self.config.engine.zero_stage:
            raise ValueError(f"checkpoint {folder} was written with ZeRO stage {state['zero_stage']}, this run uses "
                             f"{self.config.engine.zero_stage}; set engine.zero_stage={state['zero_stage']}")
        path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"DeepSpeed could not load {folder / TAG}; the files may be incomplete")


def export_weights(folder: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 weights from the ZeRO partitions, in one process (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)
