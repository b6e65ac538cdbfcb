"""Configuration of the sparsity levels carried by the ViT blocks."""
from __future__ import annotations

from dataclasses import dataclass, field

from trivit.sparse.attention import AttentionConfig
from trivit.sparse.examples import ExampleConfig
from trivit.sparse.schedule import KeepRateScheduleConfig
from trivit.sparse.semantic import SemanticConfig
from trivit.sparse.tokens import TokenConfig


@dataclass(kw_only=True)
class SparsityConfig:
    """The three sparsity levels. Keep rates of 1.0 and ``examples.policy: none`` train the dense timm ViT on every sample."""

    tokens: TokenConfig = field(default_factory=TokenConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    examples: ExampleConfig = field(default_factory=ExampleConfig)
    schedule: KeepRateScheduleConfig = field(default_factory=KeepRateScheduleConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    """STViT's semantic tokens: an architecture of fixed token counts, outside the keep-rate schedule."""
