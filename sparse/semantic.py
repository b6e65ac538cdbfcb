"""Semantic tokens (STViT, CVPR 2023): a few cluster-centre tokens carry the later blocks.

Two of the model's own blocks form the semantic token generation module (STGM). The first
takes its queries from the initial centres, the image-token grid pooled to a
sqrt(S) x sqrt(S) grid, and its keys and values from the image tokens. The second takes its
queries from the first's output plus learnable global centres (``global_centres``, the one
parameter trivit adds to timm's state_dict), and its keys and values from those queries and the
image tokens. Every later block runs on the S semantic tokens alone; the image tokens are
dropped. With ``recover_at`` (STViT-R) that block lets the image tokens of the STGM's input
query the semantic tokens, X' = X + Attn(X, S, S) then the block's MLP, which restores the
full token map for the blocks after it.

``head: gap`` (the paper) drops the prefix tokens at the STGM and classifies the mean of the
final tokens; ``head: cls`` carries [CLS] through the STGM as one more query, key and value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from trivit.config import ConfigError, check


@dataclass(kw_only=True)
class SemanticConfig:
    """STViT's semantic tokens; ``num_tokens: null`` turns them off."""

    num_tokens: int | None = None
    """Semantic tokens after the STGM, a square (the paper: 16, a 4 x 4 grid of initial centres)."""
    after_block: int | None = None
    """The STGM is blocks ``after_block`` and ``after_block + 1``; null: depth // 3 (4 of 12 blocks, the paper)."""
    pool: Literal["max", "avg"] = "max"
    """How the image-token grid is pooled to the initial centres (adaptive max pooling in the authors' code)."""
    global_centres: bool = True
    """Learnable centres added to the second STGM block's queries (the parameter ``global_centres``)."""
    head: Literal["gap", "cls"] = "gap"
    """'gap': classify the mean of the final tokens (the paper); 'cls': carry [CLS] through and classify it."""
    recover_at: int | None = None
    """A block after the STGM at which the image tokens query the semantic tokens and the full token
    map is restored (STViT-R); null: never."""

    def __post_init__(self) -> None:
        check(self.num_tokens is None or (self.num_tokens > 0 and math.isqrt(self.num_tokens) ** 2 == self.num_tokens),
              "num_tokens", self.num_tokens, "a positive square (16 = 4 x 4), or null (off)")
        check(self.after_block is None or self.after_block >= 0, "after_block", self.after_block,
              "a block index >= 0, or null (depth // 3)")
        check(self.recover_at is None or self.recover_at >= 0, "recover_at", self.recover_at, "a block index, or null")

    @property
    def enabled(self) -> bool:
        return self.num_tokens is not None

    def first_block(self, depth: int) -> int:
        """The first STGM block of a model with ``depth`` blocks."""
        return depth // 3 if self.after_block is None else self.after_block


def check_semantic_fits(config: SemanticConfig, depth: int, num_patches: int, num_prefix_tokens: int,
                        token_keep_rate: float, attention_keep_rate: float, locations: list[int], fuse: bool) -> None:
    """Refuse a semantic stage that does not fit the model or cannot compose with the other levels."""
    first = config.first_block(depth)
    if first + 2 > depth:
        raise ConfigError("sparsity.semantic.after_block", f"got {config.after_block}: the STGM would be blocks {first} "
                                                           f"and {first + 1}, but the model has {depth} blocks; allowed: "
                                                           f"at most {depth - 2}")
    if config.recover_at is not None and not first + 1 < config.recover_at < depth:
        raise ConfigError("sparsity.semantic.recover_at", f"got {config.recover_at}; allowed: a block after the STGM "
                                                          f"({first + 2}..{depth - 1}), or null")
    if config.num_tokens > num_patches:
        raise ConfigError("sparsity.semantic.num_tokens", f"got {config.num_tokens}, more than the {num_patches} image "
                                                          "tokens it would summarise")
    if num_prefix_tokens != 1 and (config.head == "cls" or num_prefix_tokens > 1):
        raise ConfigError("sparsity.semantic.head", f"got {config.head!r} with {num_prefix_tokens} prefix tokens; "
                                                    "semantic tokens need a ViT with one [CLS] token (head 'cls'), "
                                                    "or none and head 'gap' (no distillation or register tokens)")
    if (token_keep_rate < 1 or attention_keep_rate < 1) and any(location >= first for location in locations):
        raise ConfigError("sparsity.tokens.locations", f"got {sorted(locations)} with the token or attention level on "
                                                       f"and the STGM at blocks {first}-{first + 1}; both act on image "
                                                       f"tokens, which end there: use locations below {first}")
    if token_keep_rate < 1 and fuse:
        raise ConfigError("sparsity.tokens.fuse", "got true with semantic tokens: the fused token has no place in the "
                                                  "patch grid the initial centres pool; set false")


class SemanticTokens:
    """Where the semantic stage sits in a model, and what its blocks compute (no parameters of its own)."""

    def __init__(self, config: SemanticConfig, depth: int, grid_size: tuple[int, int], num_prefix_tokens: int):
        self.config = config
        self.first = config.first_block(depth)
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.carried_prefix = num_prefix_tokens if config.head == "cls" else 0
        """Prefix tokens in the sequence after the STGM."""
        self.roles = {self.first: "stgm1", self.first + 1: "stgm2"}
        if config.recover_at is not None:
            self.roles[config.recover_at] = "recover"

    def prefix_after(self, index: int) -> int:
        """Prefix tokens in the sequence that block ``index`` outputs."""
        return self.num_prefix_tokens if index < self.first else self.carried_prefix

    def initial_centres(self, patches: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """The image tokens (B, N, C) pooled to the centres' grid (B, S, C).

        ``positions`` (B, N) are the tokens' places in the H x W patch grid where the token level
        pruned some before the STGM (None: all H x W, in order). A cell's pool then covers its
        kept tokens only; a cell that kept none starts at zero.
        """
        batch, _, dim = patches.shape
        side = math.isqrt(self.config.num_tokens)
        cells = self.grid_size[0] * self.grid_size[1]
        if positions is None:
            grid = patches.transpose(1, 2).reshape(batch, dim, *self.grid_size)
            pool = F.adaptive_max_pool2d if self.config.pool == "max" else F.adaptive_avg_pool2d
            return pool(grid, side).flatten(2).transpose(1, 2)
        index = positions.unsqueeze(-1).expand(-1, -1, dim)
        if self.config.pool == "max":
            empty = torch.full((batch, cells, dim), float("-inf"), dtype=patches.dtype, device=patches.device)
            grid = empty.scatter(1, index, patches).transpose(1, 2).reshape(batch, dim, *self.grid_size)
            pooled = F.adaptive_max_pool2d(grid, side)
            pooled = pooled.masked_fill(pooled == float("-inf"), 0.0)
        else:
            grid = patches.new_zeros(batch, cells, dim).scatter(1, index, patches)
            grid = grid.transpose(1, 2).reshape(batch, dim, *self.grid_size)
            present = patches.new_zeros(batch, 1, cells).scatter_(2, positions.unsqueeze(1), 1.0)
            counts = F.adaptive_avg_pool2d(present.reshape(batch, 1, *self.grid_size), side)
            pooled = F.adaptive_avg_pool2d(grid, side) / counts.clamp_min(1e-12)
        return pooled.flatten(2).transpose(1, 2)

    def add_centres(self, x: torch.Tensor, global_centres: torch.Tensor) -> torch.Tensor:
        """The second STGM block's queries: its input's semantic tokens plus the global centres."""
        carried = self.carried_prefix
        return torch.cat([x[:, :carried], x[:, carried:] + global_centres], dim=1)

    def run(self, index: int, block: torch.nn.Module, x: torch.Tensor, image: torch.Tensor | None,
            positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index`` of the semantic stage on ``x``; returns its output and the STGM's input tokens.
        ``positions``: the grid places of ``x``'s patches (see :meth:`initial_centres`)."""
        role, carried, prefix = self.roles[index], self.carried_prefix, self.num_prefix_tokens
        if role == "stgm1":
            kept = x[:, :carried]
            queries = torch.cat([kept, self.initial_centres(x[:, prefix:], positions)], dim=1)
            return block.forward_cross(queries, torch.cat([kept, x[:, prefix:]], dim=1)), x
        if role == "stgm2":
            return block.forward_cross(x, image[:, prefix:], attend_self=True), image
        queries = torch.cat([x[:, :carried], image[:, prefix:]], dim=1)
        return block.forward_cross(queries, x), image
