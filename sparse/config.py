"""Configuration of the sparsity levels carried by the ViT blocks."""
from __future__ import annotations

from dataclasses import dataclass, field

from trivit.sparse.attention import AttentionConfig
from trivit.sparse.schedule import KeepRateScheduleConfig
from trivit.sparse.tokens import TokenConfig


@dataclass(kw_only=True)
class SparsityConfig:
    """Sparsity of a trivit ViT. With every keep rate at 1.0 the model is exactly the dense timm ViT."""

    tokens: TokenConfig = field(default_factory=TokenConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    schedule: KeepRateScheduleConfig = field(default_factory=KeepRateScheduleConfig)
