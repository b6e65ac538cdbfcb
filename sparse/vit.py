"""A timm VisionTransformer whose blocks carry trivit's token routing and attention masks.

The model *is* timm's ``VisionTransformer``: timm builds it from the model name with
:class:`TriLevelBlock` as its ``block_fn`` (a subclass of timm's ``Block`` with the same
parameters), and :class:`RoutedBlocks` replaces the ``nn.Sequential`` of blocks so that
routing state flows from block to block. Parameter names and shapes are timm's, so a timm
checkpoint loads strictly in either direction.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from trivit.config import ConfigError, from_dict
from trivit.sparse.config import SparsityConfig


@dataclass
class Route:
    """What one forward pass carries from block to block."""

    attn_mask: torch.Tensor | None = None
    """Boolean mask (True = attend) that the following blocks apply, or None for dense attention."""


class TriLevelBlock(Block):
    """timm's pre-norm ViT block with a routed forward.

    ``forward`` is timm's, unchanged. ``forward_routed`` is the same computation with the
    routing state threaded through: token selection acts between the attention and the MLP,
    and the attention mask of the route is applied in the attention.
    """

    def forward_routed(self, x: torch.Tensor, route: Route) -> tuple[torch.Tensor, Route]:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=route.attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, route


class RoutedBlocks(nn.Sequential):
    """The model's blocks, run in order with a :class:`Route` passed between them.

    Subclasses ``nn.Sequential`` so parameter names stay ``blocks.<i>.*`` as in timm.
    """

    def __init__(self, blocks: nn.Sequential, sparsity: SparsityConfig):
        super().__init__(*blocks)
        self.sparsity = sparsity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = Route()
        for block in self:
            x, route = block.forward_routed(x, route)
        return x


def create_vit(name: str, sparsity: SparsityConfig | Mapping[str, Any] | None = None, **timm_kwargs: Any) -> VisionTransformer:
    """Build timm ViT ``name`` (with timm's overrides) whose blocks carry the sparsity levels.

    ``sparsity`` is a :class:`SparsityConfig` or the same as a plain nested dict; None means dense.
    """
    config = sparsity if isinstance(sparsity, SparsityConfig) else _sparsity_from_mapping(sparsity)
    _check_plain_vit(name, timm_kwargs)
    model = _create_timm(name, block_fn=TriLevelBlock, **timm_kwargs)
    model.blocks = RoutedBlocks(model.blocks, config)
    return model


def _sparsity_from_mapping(sparsity: Mapping[str, Any] | None) -> SparsityConfig:
    try:
        return from_dict(SparsityConfig, sparsity)
    except ConfigError as error:
        raise error.under("sparsity") from None


def _create_timm(name: str, **kwargs: Any) -> nn.Module:
    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}; any plain ViT name works, e.g. 'deit_tiny_patch16_224'")
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as error:
        raise ValueError(f"timm model {name!r} does not accept these arguments ({error}); check model.timm_kwargs") from None


def _check_plain_vit(name: str, timm_kwargs: Mapping[str, Any]) -> None:
    """Reject models whose blocks are not timm's plain ``Block`` + ``Attention``.

    trivit replaces the block class, which would silently change any other architecture.
    The check builds the model on the meta device, so it allocates nothing.
    """
    kwargs = {k: v for k, v in timm_kwargs.items() if k != "pretrained"}
    with torch.device("meta"):
        reference = _create_timm(name, **kwargs)
    blocks = getattr(reference, "blocks", None)
    plain = (
        isinstance(reference, VisionTransformer)
        and blocks is not None
        and all(type(b) is Block and type(b.attn) is Attention for b in blocks)
    )
    if not plain:
        raise ValueError(
            f"{name!r} is not a plain ViT (timm VisionTransformer with Block/Attention blocks); "
            "trivit supports e.g. deit_*_patch16_224 and vit_*_patch16_224"
        )
