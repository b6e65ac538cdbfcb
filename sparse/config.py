"""Configuration of the sparsity levels carried by the ViT blocks."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class SparsityConfig:
    """Sparsity of a trivit ViT. With no level configured the model is exactly the dense timm ViT.

    The example, token and attention levels add their sections here (``tokens``,
    ``attention``, ``examples``, ``schedule``); a key that no level defines yet is rejected
    as unknown rather than silently ignored.
    """
