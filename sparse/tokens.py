"""Token level: keep the patch tokens that [CLS] attends to most, drop (or fuse) the rest.

Acts inside a pruning block, between its attention and its MLP. Tokens are physically
gathered out of the sequence, so every later layer runs on fewer tokens. Prefix tokens
([CLS], registers) are always kept and stay in front; a fused token, when enabled, is
appended at the end and counts as a patch at the next location (as in EViT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from trivit.config import check


@dataclass(kw_only=True)
class TokenConfig:
    """Token pruning at ``locations`` (block indices), keeping ``keep_rate`` of the patches at each."""

    keep_rate: float = 1.0
    """Fraction of patch tokens kept at each location (compounding); 1.0 = level off."""
    locations: list[int] | None = None
    """0-based indices of the blocks that prune, between their attention and their MLP; null: the
    paper's places scaled to the depth, 1/4, 1/2 and 3/4 of it (3, 6, 9 of 12 blocks; 6, 12, 18 of 24)."""
    fuse: bool = False
    """Fuse the dropped tokens into one token weighted by their [CLS] attention (EViT) instead of discarding them."""
    selector: Literal["attentive", "random"] = "attentive"
    """'attentive': top [CLS] attention; 'random': a uniformly random subset per sample (random-LTD style)."""

    def __post_init__(self) -> None:
        check(0 < self.keep_rate <= 1, "keep_rate", self.keep_rate, "a fraction in (0, 1]")
        check(self.locations is None or (len(set(self.locations)) == len(self.locations)
                                         and all(i >= 0 for i in self.locations)),
              "locations", self.locations, "distinct block indices >= 0, or null (1/4, 1/2, 3/4 of the depth)")

    def resolved_locations(self, depth: int) -> list[int]:
        """The pruning blocks of a model with ``depth`` blocks."""
        if self.locations is not None:
            return list(self.locations)
        return [depth // 4, depth // 2, 3 * depth // 4]


def kept_count(num_patches: int, keep_rate: float) -> int:
    """Patches kept out of ``num_patches``: ceil(N x keep_rate), at least 1."""
    return max(1, math.ceil(num_patches * keep_rate - 1e-9))


def select_tokens(
    x: torch.Tensor,
    cls_attention: torch.Tensor,
    keep_rate: float,
    num_prefix_tokens: int,
    *,
    fuse: bool,
    selector: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``ceil(N x keep_rate)`` of the N patch tokens of ``x`` (B, P + N, C).

    ``cls_attention`` (B, N) is the head-averaged softmax attention of [CLS] to each patch.
    Returns the new sequence (prefix, kept patches in their original order, then the fused
    token if ``fuse``) and the kept patch indices (B, K) into the N patches.
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    num_patches = patches.shape[1]
    keep = kept_count(num_patches, keep_rate)
    if selector == "random":
        scores = torch.rand(cls_attention.shape, device=x.device)
    else:
        scores = cls_attention
    order = scores.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
    kept = patches.gather(1, order.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    parts = [prefix, kept]
    if fuse and keep < num_patches:
        dropped_mask = torch.ones_like(cls_attention, dtype=torch.bool).scatter_(1, order, False)
        weights = (cls_attention * dropped_mask).unsqueeze(-1).to(patches.dtype)
        parts.append((patches * weights).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1), order
