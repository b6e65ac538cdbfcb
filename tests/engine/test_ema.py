"""The EMA of the weights stays fp32 when the training weights are bf16 (DeepSpeed's bf16 mode)."""
from __future__ import annotations

import torch
from torch import nn

from trivit.engine.ema import build_ema


def test_an_ema_of_bf16_weights_moves_at_deits_decay():
    torch.manual_seed(0)
    model = nn.Linear(40, 25).to(torch.bfloat16)  # what DeepSpeed hands back in bf16 mode
    ema = build_ema(model, decay=0.99996)
    start = ema.module.weight.detach().clone()
    assert ema.module.weight.dtype == torch.float32 and model.weight.dtype == torch.bfloat16
    target = (model.weight.float() + 0.5).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_(target)
    for _ in range(1000):
        ema.update(model)  # at the full decay (the trainer's first update, step 1, copies the weights)
    moved = (ema.module.weight != start).float().mean().item()
    assert moved > 0.99, f"only {moved:.1%} of the EMA values moved"
    expected = start + (target.float() - start) * (1 - 0.99996 ** 1000)  # the closed form of 1000 lerps
    torch.testing.assert_close(ema.module.weight, expected, rtol=0, atol=1e-5)
