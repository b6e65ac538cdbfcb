"""Analytic FLOPs of a (sparse) ViT forward pass, per image.

Counts the matrix products, as multiply-adds x 2: per block, QKV and output projections
(4 N d^2; a pruned block's own query/key and value widths in place of d), the attention
products QK^T and AV (2 N^2 d, dense even where the attention level
masks links: SDPA with a mask still computes them), and the MLP (2 N d h). A pruning block
also computes the [CLS] row of its attention scores to rank tokens by (N d) when the fused
kernel gives the output; where the attention level ranks links it computes the scores
explicitly, once, and nothing is added. The patch embedding and the head are counted once.
Pruning blocks run attention on the incoming sequence and the MLP on the selected one.

A semantic-token block (sparse/semantic.py) projects q, k and v for its queries and its context
together (one qkv product), attends from the queries to its keys and runs the projection and
the MLP on the queries: each block is counted from its shape (qkv tokens, queries, keys, MLP
tokens, ranking rows), which is (n, n, n, m, rows) for a plain or pruning block.
"""
from __future__ import annotations

from torch import nn

from trivit.sparse.blocks import head_widths
from trivit.sparse.semantic import SemanticTokens
from trivit.sparse.tokens import kept_count


def token_counts(num_patches: int, num_prefix_tokens: int, depth: int, locations: frozenset[int] | set[int],
                 keep_rate: float, fuse: bool) -> list[tuple[int, int, int]]:
    """(attention length, MLP length, [CLS] ranking rows) of every block at token ``keep_rate``."""
    counts = []
    patches = num_patches
    for index in range(depth):
        attention_length = num_prefix_tokens + patches
        ranks = index in locations and keep_rate < 1
        if ranks:
            kept = kept_count(patches, keep_rate)
            patches = kept + (1 if fuse and kept < patches else 0)
        counts.append((attention_length, num_prefix_tokens + patches, int(ranks)))
    return counts


BlockShape = tuple[int, int, int, int, int]
"""(qkv tokens, queries, keys, MLP tokens, ranking rows) of one block."""


def semantic_shapes(counts: list[tuple[int, int, int]], semantic: SemanticTokens, num_patches: int) -> list[BlockShape]:
    """The block shapes of a model with a semantic stage; ``counts`` are its token counts without one."""
    carried = semantic.carried_prefix
    length = carried + semantic.config.num_tokens
    if semantic.first > 0:  # the patches the token level left for the STGM
        num_patches = counts[semantic.first - 1][1] - semantic.num_prefix_tokens
    shapes = []
    for index, (n, m, rows) in enumerate(counts):
        role = semantic.roles.get(index)
        if role == "stgm1":
            shapes.append((length + carried + num_patches, length, carried + num_patches, length, 0))
        elif role == "stgm2":
            shapes.append((length + num_patches, length, length + num_patches, length, 0))
        elif role == "recover":
            recovered = carried + num_patches
            shapes.append((recovered + length, recovered, length, recovered, 0))
            length = recovered
        elif index < semantic.first:
            shapes.append((n, n, n, m, rows))
        else:
            shapes.append((length, length, length, length, 0))
    return shapes


BlockWidth = tuple[int, int, int]
"""(heads x query/key width, heads x value width, MLP width) of one block: (d, d, h) in timm's ViT."""


def vit_flops(shapes: list[BlockShape], dim: int, widths: list[BlockWidth], num_patches: int, patch_pixels: int,
              num_classes: int) -> float:
    """FLOPs per image of a ViT of embedding width ``dim`` whose blocks have ``shapes`` and ``widths``."""
    blocks = sum(2 * (t * dim * (2 * qk + v) + q * v * dim + q * k * (qk + v) + rows * k * qk) + 2 * (2 * m * dim * mlp)
                 for (t, q, k, m, rows), (qk, v, mlp) in zip(shapes, widths))
    embed = 2 * num_patches * patch_pixels * dim
    head = 2 * dim * num_classes
    return float(blocks + embed + head)


def block_widths(model: nn.Module) -> list[BlockWidth]:
    """Each block's widths, timm's or a pruned model's (sparse/pruned.py)."""
    widths = []
    for block in model.blocks:
        attn = block.attn
        qk, v = head_widths(attn)
        widths.append((attn.num_heads * qk, attn.num_heads * v, block.mlp.fc1.out_features))
    return widths


def model_flops(model: nn.Module, token_keep_rate: float | None = None, semantic: bool = True) -> float:
    """FLOPs per image of a ``create_vit`` model at ``token_keep_rate`` (default: its current rate);
    ``semantic=False`` counts it without its semantic stage (the plain ViT of the same size)."""
    blocks = model.blocks
    rate = blocks.token_keep_rate if token_keep_rate is None else token_keep_rate
    num_patches = model.patch_embed.num_patches
    counts = token_counts(num_patches, blocks.num_prefix_tokens, len(blocks), blocks.locations, rate,
                          blocks.sparsity.tokens.fuse)
    if blocks.attention_keep_rate < 1:  # the explicit scores give the [CLS] row too
        counts = [(n, m, 0) for n, m, _ in counts]
    shapes = ([(n, n, n, m, rows) for n, m, rows in counts] if blocks.semantic is None or not semantic
              else semantic_shapes(counts, blocks.semantic, num_patches))
    proj = model.patch_embed.proj
    patch_pixels = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    return vit_flops(shapes, model.embed_dim, block_widths(model), num_patches, patch_pixels, model.num_classes)


def dense_fraction(model: nn.Module) -> float:
    """FLOPs of the model at its current token keep rate over its dense FLOPs (the plain ViT's, for semantic tokens)."""
    return model_flops(model) / model_flops(model, 1.0, semantic=False)
