"""Timing helpers shared by the benchmarks: the same training step, timed the same way."""
from __future__ import annotations

import time

import torch
from torch import nn


def seconds_per_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                           labels: torch.Tensor, steps: int) -> float:
    """Mean wall-clock seconds of ``steps`` steps of forward, cross-entropy, backward and optimizer step."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if images.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps
