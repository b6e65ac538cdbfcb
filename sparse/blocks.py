"""trivit's ViT block: timm's ``Block`` whose attention also yields the attention the router ranks by.

The parameters, their names and the block's arithmetic are timm's. What the block adds:

- the attention output always comes from a fused kernel (``scaled_dot_product_attention``, or
  ``flex_attention`` for the attention level's links when chosen), never from a B x H x N x N
  matrix in memory, except where the attention level ranks links (below);
- a pruning block ranks tokens by the [CLS] row of its attention only: that one row's softmax is
  computed separately, O(N) per head, next to the fused kernel;
- where the attention level builds its mask, it needs the patch-to-patch attention: there the
  block computes the softmax explicitly, once, and the same probabilities give the output and
  the ranking.

Every ranking (the [CLS] row, the link scores) is computed in fp32 from the block's q and k,
whatever the training precision, so bf16 rounding does not reorder tokens or links.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

Ranking = Literal["none", "cls", "pooled", "full"]
"""What attention a block returns beside its output: none, the [CLS] row (B, 1, L), the row of the mean
query (B, 1, L: the example level's stand-in for [CLS] where semantic tokens drop it), or all rows (B, L, L)."""


class Links(NamedTuple):
    """The attention level's mask as the following blocks apply it."""

    mask: torch.Tensor
    """(B, 1, L, L) bool, True = attend; what the next pruning location ranks under."""
    density: torch.Tensor | None = None  # noqa: UP007 - TorchScript reads NamedTuple fields, not X | None
    """Fraction of the kept patch-to-patch links the mask lets through, over the batch (for the logs)."""
    block_mask: BlockMask | None = None  # noqa: UP007
    """The same links for ``flex_attention`` (kernel 'flex'); None runs SDPA with ``mask``."""
    bias: torch.Tensor | None = None  # noqa: UP007
    """On CUDA, the same links as SDPA's additive mask (0 or -inf) in the queries' dtype, built once at
    the location for every block up to the next: a boolean mask would be turned into one in every block."""


def build_links(mask: torch.Tensor, kernel: str, density: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> Links:
    """:class:`Links` for ``mask`` (B, 1, L, L) and the kernel 'sdpa' or 'flex'; ``dtype`` is the
    queries' (the autocast dtype, else the tokens')."""
    if kernel != "flex":
        return Links(mask, density, bias=additive_mask(mask, dtype) if takes_additive_mask(mask.device) else None)
    batch, _, length, _ = mask.shape

    def kept_link(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return mask[b, 0, q, kv]

    return Links(mask, density, create_block_mask(kept_link, batch, None, length, length, device=mask.device))


def takes_additive_mask(device: torch.device) -> bool:
    """Whether SDPA gets the links as an additive mask on ``device``: on CUDA, where a boolean one would be
    converted inside every call; the CPU kernels take the boolean mask as it is."""
    return device.type == "cuda"


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` (True = attend) as an additive one: CUDA's memory-efficient and cuDNN kernels take it."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def checkpointed(enabled: bool, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, recomputed in backward instead of kept when ``enabled`` (and grad is on).

    Non-reentrant ``torch.utils.checkpoint`` restores the RNG (dropout, drop-path, the random
    selector) and autocast state, so the recomputation is the forward pass again, bit for bit.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


Router = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, "Links | None", "torch.Tensor | None"]]
"""(tokens, attention) -> (tokens, links, the kept patches' indices into the incoming patches or None)."""


class TriLevelBlock(Block):
    """timm's pre-norm ViT block; ``forward_routed`` puts a router between attention and MLP."""

    def forward(self, x: torch.Tensor, links: Links | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attend(self.norm1(x), links, "none")[0]))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_routed(self, x: torch.Tensor, links: Links | None, route: Router,
                       ranking: Ranking) -> tuple[torch.Tensor, Links | None, torch.Tensor, torch.Tensor | None]:
        """The block with ``route(x, attention)`` between attention and MLP.

        Returns the output, the links and kept indices ``route`` returned and the head-averaged [CLS]
        attention row (B, L) before routing, detached. ``route`` must not change state outside: under activation
        checkpointing it runs again in backward, and a compiled graph cannot replay such changes.
        """
        attn_out, attention = self.attend(self.norm1(x), links, ranking)
        x = x + self.drop_path1(self.ls1(attn_out))
        x, links, kept = route(x, attention)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, links, attention[:, 0].detach(), kept

    def forward_paired(self, x: torch.Tensor, paired: torch.Tensor | None, distractors: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """DCAL's block: self-attention on ``x``, and PWCA on ``paired`` (None: none), whose queries attend
        to their own keys and values and to the distractors' (``x[distractors]``: the self-attention
        stream at this depth) under one softmax, with this block's weights. Returns both outputs and
        the self-attention's head-averaged attention (B, L, L), detached (DCAL's rollout reads it)."""
        attn_out, attention = self.attend(self.norm1(x), None, "full")
        if paired is not None:  # not through forward_cross: FSDP2 would reshard this block after that entry
            paired = self.cross(paired, x[distractors], attend_self=True)
        x = x + self.drop_path1(self.ls1(attn_out))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, paired, attention.detach()

    def forward_cross(self, x: torch.Tensor, context: torch.Tensor, attend_self: bool = False) -> torch.Tensor:
        """The block with its attention's queries from ``x`` and its keys and values from ``context``
        (from ``[x; context]`` with ``attend_self``), both normalised by the block's ``norm1``: the
        semantic tokens' blocks (sparse/semantic.py), DCAL's GLCA (sparse/dcal.py). The residual and the MLP
        are the queries'."""
        return self.cross(x, context, attend_self)

    def cross(self, x: torch.Tensor, context: torch.Tensor, attend_self: bool = False) -> torch.Tensor:
        """:meth:`forward_cross`'s arithmetic, for the block's other entries to call."""
        attn = self.attn
        batch, queries, _ = x.shape
        both = self.norm1(torch.cat([x, context], dim=1))
        q, k, v = split_heads(attn, attn.qkv(both))
        keys = slice(0, None) if attend_self else slice(queries, None)
        q, k, v = attn.q_norm(q[:, :, :queries]), attn.k_norm(k[:, :, keys]), v[:, :, keys]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0,
                                             scale=sdpa_scale(attn))
        out = attn.norm(out.transpose(1, 2).reshape(batch, queries, attn.attn_dim))
        if attn.gate is not None:
            out = out * attn.gate(both[:, :queries]).sigmoid()
        x = x + self.drop_path1(self.ls1(attn.proj_drop(attn.proj(out))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def attend(self, x: torch.Tensor, links: Links | None,
               ranking: Ranking) -> tuple[torch.Tensor, torch.Tensor | None]:
        """timm ``Attention`` on normalised ``x``, and the head-averaged fp32 softmax rows ``ranking`` asks for."""
        attn = self.attn
        batch, length, _ = x.shape
        gate = attn.gate(x).sigmoid() if attn.gate is not None else None
        q, k, v = split_heads(attn, attn.qkv(x))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if ranking == "full":
            probs = _softmax_rows(q, k, attn.scale, links)
            out = attn.attn_drop(probs).to(v.dtype) @ v
            attention = head_mean(attn, probs)
        else:
            out = _fused_attention(q, k, v, links, attn.attn_drop.p if self.training else 0.0, sdpa_scale(attn))
            rows = {"cls": q[:, :, :1], "pooled": q.mean(dim=2, keepdim=True)}.get(ranking)
            attention = None if rows is None else head_mean(attn, _softmax_rows(rows, k, attn.scale, links))
        out = attn.norm(out.transpose(1, 2).reshape(batch, length, attn.attn_dim))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out)), attention


def split_heads(attn: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, L, d) from an attention's qkv projection (B, L, ...): timm's layout, or the
    attention's own ``split_heads`` (a pruned block's widths, sparse/pruned.py)."""
    own = getattr(attn, "split_heads", None)
    if own is not None:
        return own(qkv)
    batch, length, _ = qkv.shape
    return qkv.reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def head_widths(attn: nn.Module) -> tuple[int, int]:
    """(query/key, value) width of each head: timm's ``head_dim``, or a pruned attention's own."""
    return (getattr(attn, "qk_dim", None) or attn.head_dim, getattr(attn, "v_dim", None) or attn.head_dim)


def head_mean(attn: nn.Module, probs: torch.Tensor) -> torch.Tensor:
    """Attention ``probs`` (B, H, rows, L) averaged over the heads (the kept ones, while pruning)."""
    own = getattr(attn, "head_mean", None)
    return probs.mean(dim=1) if own is None else own(probs)


def sdpa_scale(attn: nn.Module) -> float | None:
    """The scale to pass the fused kernel: None (its default, timm's head_dim ** -0.5) unless the
    attention keeps another one (a pruned block keeps its base model's)."""
    return attn.scale if hasattr(attn, "split_heads") else None


def _softmax_rows(q: torch.Tensor, k: torch.Tensor, scale: float, links: Links | None) -> torch.Tensor:
    """Softmax attention (B, H, rows, L) of the query rows ``q`` in fp32 (or wider), under the links' mask."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.to(dtype) * scale) @ k.to(dtype).transpose(-2, -1)
        if links is not None:
            scores = scores.masked_fill(~links.mask[:, :, :q.shape[2]], float("-inf"))
        return scores.softmax(dim=-1)


# torch.fx traces a routed model at fixed keep rates with these as single calls: their insides read shapes, dtypes
# and devices as Python values (which the tracer only has as proxies) and change no module state. A dense model
# calls neither, so its traced graph holds plain ops only (and TorchScript takes it).
torch.fx.wrap("_softmax_rows")
torch.fx.wrap("_masked_attention")


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, links: Links | None,
                     dropout_p: float, scale: float | None) -> torch.Tensor:
    if links is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return _masked_attention(q, k, v, links, dropout_p, scale)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, links: Links,
                      dropout_p: float, scale: float | None) -> torch.Tensor:
    """Attention over the attention level's links: flex_attention with their block mask, or SDPA with the mask."""
    if links.block_mask is not None:
        return flex_attention(q, k, v, block_mask=links.block_mask, scale=scale)
    mask = links.mask
    if takes_additive_mask(q.device):
        mask = links.bias if links.bias is not None and links.bias.dtype == q.dtype else additive_mask(mask, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
