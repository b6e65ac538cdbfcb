"""FSDP2: PyTorch's ``fully_shard`` on every ViT block, then on the whole model (as torchtitan does).

Applied directly rather than through Accelerate's plugin, which is ignored on CPU (it would
run DDP while the config says FSDP); the same code then runs on CPU (gloo) and GPUs (NCCL).
Checkpoints are sharded: each rank writes its shards of the model and optimizer through
``torch.distributed.checkpoint``; ``export_weights`` consolidates them offline.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from trivit.engine.backends.base import Backend, NamedGradients, OptimizerFactory
from trivit.engine.compile import compile_blocks

SHARDS = "sharded"


class FSDPBackend(Backend):
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        policy = MixedPrecisionPolicy()
        if self.amp_dtype is not None:
            policy = MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=torch.float32)
        if self.config.engine.compile:
            compile_blocks(model, self.config.engine.compile_backend)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
            register_fsdp_forward_method(block, "forward_routed")  # the pruning blocks' entry point
            register_fsdp_forward_method(block, "forward_cross")  # the semantic tokens' blocks
            register_fsdp_forward_method(block, "forward_paired")  # DCAL's
        fully_shard(model, mp_policy=policy)
        self.model = self.module = model
        self.optimizer = make_optimizer(model)

    def autocast(self) -> AbstractContextManager:
        """Mixed precision comes from the FSDP policy (bf16 parameters in compute, fp32 reduction)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        self.model.set_requires_gradient_sync(last_micro_batch)
        loss.backward()

    def step(self) -> None:
        self._report_gradients()
        clip = self.config.optim.clip_grad
        if clip is not None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()  # the norm over every rank's shards
            nn.utils.clip_grads_with_norm_(self.model.parameters(), clip, norm)
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def zero_entries(self, entries: dict[str, torch.Tensor]) -> None:
        """Each rank zeroes its shard of the entries (the mask sharded as the parameter is)."""
        for name, param in self.module.named_parameters():
            if name not in entries:
                continue
            full = entries[name].to(device=param.device, dtype=torch.uint8)
            mask = distribute_tensor(full, param.device_mesh, param.placements).to_local().bool()
            with torch.no_grad():
                param.to_local().masked_fill_(mask, 0)
            for value in self.optimizer.state.get(param, {}).values():
                if isinstance(value, DTensor) and value.shape == param.shape:
                    value.to_local().masked_fill_(mask, 0)

    def named_gradients(self) -> NamedGradients:
        for name, param in self.module.named_parameters():
            grad = param.grad
            yield (name, param.full_tensor() if isinstance(param, DTensor) else param,
                   grad.full_tensor() if isinstance(grad, DTensor) else grad)

    def save(self, folder: Path) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / SHARDS))
        return {}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        shards = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(shards, checkpoint_id=str(folder / SHARDS))
        set_state_dict(self.model, self.optimizer, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"])


def export_weights(folder: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full model weights from the sharded checkpoint, in one process, without a process group.

    Only the model's entries are read, straight into memory: no consolidated copy of the whole
    checkpoint (the optimizer's moments are twice the model) is written anywhere, so a small /tmp
    on a compute node never fails the end of a run."""
    reader = dcp.FileSystemReader(str(folder / SHARDS))
    prefix = "model."
    weights = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in reader.read_metadata().state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    dcp.load(weights, storage_reader=reader, no_dist=True)
    return {key.removeprefix(prefix): tensor for key, tensor in weights.items()}
