"""Capturing and restoring every RNG a training step draws from (for exact resume)."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and this rank's CUDA generator states, as tensors and plain values.

    Only the current device's generator: another launch of the same run may see another number of
    GPUs (torchrun's 8 against ``srun --gpus-per-task=1``'s 1), and a rank draws on its own GPU only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
        "cuda_device": torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        if state.get("cuda_device") is not None:
            torch.cuda.set_rng_state(state["cuda_device"], device)
        elif len(state.get("cuda", [])) > device:  # checkpoints before trivit kept every visible device's state
            torch.cuda.set_rng_state(state["cuda"][device], device)
