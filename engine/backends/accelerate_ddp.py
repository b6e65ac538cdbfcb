"""One process or DDP, through Accelerate: its DDP wrapper, mixed precision and fp16 loss scaling."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from trivit.engine.backends.base import Backend, OptimizerFactory
from trivit.engine.compile import compile_model

MIXED_PRECISION = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


class AccelerateBackend(Backend):
    """``single`` and ``ddp``: every rank holds the whole model; ``trainer.pt`` holds its state."""

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.accelerator = Accelerator(cpu=self.device.type == "cpu", mixed_precision=MIXED_PRECISION[self.amp_dtype],
                                       step_scheduler_with_optimizer=False)
        if self.config.engine.compile:
            compile_model(model, self.config.engine.compile_backend)
        self.optimizer = make_optimizer(model)
        self.model, self.wrapped_optimizer = self.accelerator.prepare(model, self.optimizer)
        self.module = model  # what DDP wraps; accelerate's unwrap_model would import DeepSpeed (and its warnings)

    def autocast(self) -> AbstractContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        context = nullcontext() if last_micro_batch else self.accelerator.no_sync(self.model)
        with context:
            self.accelerator.backward(loss)

    def step(self) -> None:
        self._report_gradients()
        clip = self.config.optim.clip_grad
        if clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), clip)
        self.wrapped_optimizer.step()

    def zero_grad(self) -> None:
        self.wrapped_optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and state["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])


def export_weights(folder: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return state["model"]
