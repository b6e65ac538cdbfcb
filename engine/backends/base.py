"""What every training backend provides to the trainer: one step, and its share of a checkpoint.

The trainer owns the loop, the data, the schedules and the sparsity state; a backend owns how
the model and optimizer are wrapped (DDP, FSDP2, a DeepSpeed engine), how a micro-batch's loss
is backpropagated, how the optimizer steps, and how the wrapped state is written to and read
from a checkpoint folder. Every method that touches the wrapped model is called on every rank
in the same order.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
NamedGradients = Iterator[tuple[str, torch.Tensor, "torch.Tensor | None"]]
"""(name, whole parameter, its whole gradient) of every parameter of the model, in a fixed order."""


class Backend(ABC):
    """One backend; :meth:`setup` wraps the model and builds the optimizer on the wrapped parameters."""

    name: str
    model: nn.Module
    """What the forward pass calls (a wrapper where the backend has one)."""
    module: nn.Module
    """The timm/trivit model itself: keep rates, blocks, EMA and evaluation go through it."""
    optimizer: torch.optim.Optimizer
    """The torch optimizer whose param_groups carry the learning rate the schedule sets."""
    gradient_hook: Callable[[NamedGradients], None] | None = None
    """Called on every rank once per step when the step's gradients are complete and reduced, before
    the update and any clipping, with :meth:`named_gradients` (NViT's saliency reads them)."""

    def __init__(self, config: TrainConfig, world: World, device: torch.device, amp_dtype: torch.dtype | None):
        self.config, self.world, self.device, self.amp_dtype = config, world, device, amp_dtype

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None: ...

    def autocast(self) -> AbstractContextManager:
        """The forward pass's mixed-precision context."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare_inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True)

    @abstractmethod
    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Backpropagate one micro-batch; gradients are reduced across ranks with the last one."""

    @abstractmethod
    def step(self) -> None:
        """Clip (``optim.clip_grad``) and take the optimizer step, after the step's last backward."""

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def save(self, folder: Path) -> dict[str, Any]:
        """Write this backend's state under ``folder`` (a collective); returns entries for the main
        rank's ``trainer.pt``."""

    @abstractmethod
    def load(self, folder: Path, state: dict[str, Any]) -> None:
        """Restore what :meth:`save` wrote (``state`` is the loaded ``trainer.pt``)."""

    def named_gradients(self) -> NamedGradients:
        """Every parameter and gradient whole (a collective where they are sharded)."""
        for name, param in self.module.named_parameters():
            yield name, param, param.grad

    def zero_entries(self, entries: dict[str, torch.Tensor]) -> None:
        """Set the ``entries`` (name -> bool tensor of the parameter's shape) of the parameters and of their
        optimizer state to zero, on every rank (a collective where they are sharded)."""
        for name, param in self.module.named_parameters():
            if name in entries:
                mask = entries[name].to(param.device)
                with torch.no_grad():
                    param.masked_fill_(mask, 0)
                for value in self.optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.masked_fill_(mask, 0)

    def _report_gradients(self) -> None:
        if self.gradient_hook is not None:
            self.gradient_hook(self.named_gradients())

    def description(self) -> str:
        return f"{self.name} on {self.world.world_size} process(es), {self.device}"
