"""The exponential moving average of the weights: timm's ``ModelEmaV3``, kept in fp32.

DeepSpeed's bf16/fp16 modes cast the module itself before the EMA copy is made; an EMA in bf16
with DeiT's decay 0.99996 hardly moves (each update is below bf16's resolution near 1), so the
copy is kept in fp32 (timm's ``dtype``) and updated from the training weights, whatever their dtype.
"""
from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn


def build_ema(model: nn.Module, decay: float) -> ModelEmaV3:
    return ModelEmaV3(model, decay=decay, dtype=torch.float32)
