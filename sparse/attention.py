"""Attention level: each query patch keeps only its strongest links to the other kept patches.

Built at the pruning locations, right after token selection, from the block's head-averaged
attention restricted to the kept tokens. The result is a boolean mask (True = attend) with no
gradient, applied through ``scaled_dot_product_attention`` by every following block up to the
next location. Prefix tokens ([CLS]) and the fused token always see and are seen by everyone,
so no row of the mask is ever empty.

Which links a query patch keeps, exactly as the Tri-Level E-ViT reference code: every kept
patch key whose attention is greater than or equal to the row's k-th largest value,
k = ceil(K x keep_rate) of the K kept patches. Ties at the threshold are all kept, so a row
keeps at least k links and more when values tie. This matters from the second location on:
its ranking attention was computed under the previous mask, so many rows hold fewer than k
non-zero values and keep all of their (zero) tied links. The rule compares values only, so it
is deterministic on every device (no dependence on the order ``topk`` returns ties in).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trivit.config import check
from trivit.sparse.tokens import kept_count


@dataclass(kw_only=True)
class AttentionConfig:
    """Attention masking at the token locations (``sparsity.tokens.locations``)."""

    keep_rate: float = 1.0
    """Fraction of the kept patches that each query patch attends to; 1.0 = level off."""
    kernel: Literal["auto", "sdpa", "flex"] = "auto"
    """How the blocks after a location apply its mask: 'sdpa' (scaled_dot_product_attention with the
    mask; on CUDA an additive mask, which its memory-efficient kernel takes), 'flex' (flex_attention
    with a block mask of the kept links; CUDA with engine.compile: flex has no backward on the CPU
    and runs unfused uncompiled), 'auto' (sdpa: flex is opt-in until benchmarks/gpu_check.sh has measured it)."""

    def __post_init__(self) -> None:
        check(0 < self.keep_rate <= 1, "keep_rate", self.keep_rate, "a fraction in (0, 1]")


@torch.no_grad()
def build_attention_mask(
    attention: torch.Tensor,
    kept: torch.Tensor,
    keep_rate: float,
    num_prefix_tokens: int,
    num_suffix_tokens: int,
) -> torch.Tensor:
    """Mask (B, 1, L, L) for the sequence [prefix, kept patches, suffix] of length L.

    ``attention`` (B, P + N, P + N) is the head-averaged attention before token selection;
    ``kept`` (B, K) are the kept patch indices into the N patches. Each kept patch query keeps
    its kept patch keys whose attention is >= the row's ``ceil(K x keep_rate)``-th largest (ties
    kept); prefix and suffix rows and columns are all True.
    """
    prefix = num_prefix_tokens
    patch_attention = attention[:, prefix:, prefix:]
    batch, num_kept = kept.shape
    rows = patch_attention.gather(1, kept.unsqueeze(-1).expand(-1, -1, patch_attention.shape[-1]))
    among_kept = rows.gather(2, kept.unsqueeze(1).expand(-1, num_kept, -1))
    threshold = among_kept.topk(kept_count(num_kept, keep_rate), dim=-1).values[..., -1:]
    length = prefix + num_kept + num_suffix_tokens
    mask = torch.ones(batch, length, length, dtype=torch.bool, device=attention.device)
    mask[:, prefix:prefix + num_kept, prefix:prefix + num_kept] = among_kept >= threshold
    return mask.unsqueeze(1)


def patch_link_density(mask: torch.Tensor, num_prefix_tokens: int, num_suffix_tokens: int) -> torch.Tensor:
    """Fraction of the kept patch-to-patch links that ``mask`` (B, 1, L, L) lets through, over the batch."""
    end = mask.shape[-1] - num_suffix_tokens
    return mask[:, 0, num_prefix_tokens:end, num_prefix_tokens:end].float().mean()
