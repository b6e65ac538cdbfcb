"""The three sparsity levels (examples, tokens, attention) and the ViT blocks that carry them."""
from trivit.sparse.blocks import TriLevelBlock
from trivit.sparse.config import SparsityConfig
from trivit.sparse.taps import Tapped, TapRequest
from trivit.sparse.vit import RoutedBlocks, TriLevelViT, create_vit, set_keep_rates

__all__ = ["SparsityConfig", "RoutedBlocks", "TapRequest", "Tapped", "TriLevelBlock", "TriLevelViT", "create_vit",
           "set_keep_rates"]
