"""A timm VisionTransformer whose blocks carry trivit's token routing and attention masks.

The model is timm's ``VisionTransformer``: timm builds it from the model name with
:class:`TriLevelBlock` as its ``block_fn`` (a subclass of timm's ``Block`` with the same
parameters), :class:`RoutedBlocks` replaces the ``nn.Sequential`` of blocks so that routing
state flows from block to block, and the instance becomes a :class:`TriLevelViT`, a subclass
that adds no state and keeps timm's paths that iterate the blocks from bypassing the routing.
Parameter names and shapes are timm's, so a timm checkpoint loads strictly in either direction.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models import split_model_name_tag
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from trivit.config import ConfigError, from_dict
from trivit.sparse.attention import build_attention_mask, patch_link_density
from trivit.sparse.blocks import Links, TriLevelBlock, build_links, checkpointed
from trivit.sparse.config import SparsityConfig
from trivit.sparse.semantic import SemanticTokens, check_semantic_fits
from trivit.sparse.taps import TapRecorder, TapRequest, answer
from trivit.sparse.tokens import select_tokens

# torch.fx traces a routed model at fixed keep rates with the routing's kernels as single calls (they compute
# counts from shapes as Python ints, which the tracer only has as proxies).
for _leaf in ("select_tokens", "build_attention_mask", "patch_link_density", "build_links", "query_dtype"):
    torch.fx.wrap(_leaf)


class RoutedBlocks(nn.Sequential):
    """The model's blocks, run in order with token selection and attention masks between them.

    Subclasses ``nn.Sequential`` so parameter names stay ``blocks.<i>.*`` as in timm. Every
    block runs on every forward pass, in the same order, whatever the keep rates: ranks
    never take different module paths (what DeepSpeed ZeRO-3 requires).
    """

    def __init__(self, blocks: nn.Sequential, sparsity: SparsityConfig, num_prefix_tokens: int,
                 grid_size: tuple[int, int]):
        super().__init__(*blocks)
        self.sparsity = sparsity
        self.num_prefix_tokens = num_prefix_tokens
        self.semantic = (SemanticTokens(sparsity.semantic, len(blocks), grid_size, num_prefix_tokens)
                         if sparsity.semantic.enabled else None)
        """STViT's semantic stage (its blocks' roles; the global centres are the model's parameter)."""
        end = len(blocks) if self.semantic is None else self.semantic.first
        self.locations = frozenset(i for i in sparsity.tokens.resolved_locations(len(blocks)) if i < end)
        """The pruning blocks: the configured ones (before the semantic stage, which prunes no image token)."""
        self.token_keep_rate = sparsity.tokens.keep_rate
        self.attention_keep_rate = sparsity.attention.keep_rate
        self.tokens_per_block: list[int] = []
        """Sequence length after each block in the last forward pass (what its MLP ran on)."""
        self.attention_density: dict[int, torch.Tensor] = {}
        """Per pruning block of the last forward: the fraction of kept patch-to-patch links its mask
        lets through (over the batch); above the attention keep rate where ties are kept."""
        self.grad_checkpointing = False
        """Recompute every block in backward instead of keeping its activations (routing included)."""
        self.explicit_attention = False
        """Compute every ranking block's attention as an explicit softmax (B x H x N x N), as before the
        fused path; the same numbers, kept to measure what the fused path saves (``trivit bench speed``)."""

    @property
    def active(self) -> bool:
        return self.token_keep_rate < 1 or self.attention_keep_rate < 1

    def forward(self, x: torch.Tensor, global_centres: torch.Tensor | None = None,
                recorder: TapRecorder | None = None) -> torch.Tensor:
        """``global_centres``: the semantic stage's (the model's parameter), added outside the
        checkpointed blocks so that a recomputation reads no parameter of the model itself.
        ``recorder``: what the caller asked the forward pass to hand back (sparse/taps.py)."""
        links, image, positions = None, None, None
        self.tokens_per_block = []
        self.attention_density = {}
        recorder = recorder or TapRecorder(None, len(self))
        semantic = self.semantic
        for index, block in enumerate(self):
            prune = self.active and index in self.locations
            record = recorder.wants_cls_attention(index)
            cls_attention = None
            prefix = semantic.prefix_after(index) if semantic is not None else self.num_prefix_tokens
            if semantic is not None and index in semantic.roles:
                if semantic.roles[index] == "stgm2" and global_centres is not None:
                    x = semantic.add_centres(x, global_centres)
                x, image = self.checkpointed(semantic.run, index, block, x, image, positions)
                links = None  # the attention level stops at the semantic stage
            elif prune or record:
                full = self.explicit_attention or (prune and self.attention_keep_rate < 1)
                ranking = "full" if full else "cls" if prefix else "pooled"
                route = self.route if prune else partial(_unchanged, links=links)
                x, links, cls_row, kept = self.checkpointed(block.forward_routed, x, links, route, ranking)
                if semantic is not None and kept is not None:  # where the STGM's pooling finds each patch
                    positions = kept if positions is None else positions.gather(1, kept)
                if record:
                    cls_attention = cls_row[:, prefix:]
                if prune and links is not None:
                    self.attention_density[index] = links.density
            else:
                x = self.checkpointed(block, x, links)
            recorder.record(index, x, cls_attention)
            self.tokens_per_block.append(x.shape[1])
        return x

    def checkpointed(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)``, recomputed in backward instead of kept when checkpointing is on."""
        return checkpointed(self.grad_checkpointing, function, *args)

    def route(self, x: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, Links | None, torch.Tensor | None]:
        """Token selection, then the attention mask over the kept tokens (at a pruning block); returns
        the tokens, the links, and the kept patches' indices (None where the token level is off).

        ``attention`` is the head-averaged softmax: its [CLS] row (B, 1, L), or every row (B, L, L)
        when the attention level ranks links here.
        """
        prefix = self.num_prefix_tokens
        tokens = self.sparsity.tokens
        pruned = self.token_keep_rate < 1
        if pruned:
            x, kept = select_tokens(x, attention[:, 0, prefix:], self.token_keep_rate, prefix,
                                    fuse=tokens.fuse, selector=tokens.selector)
        else:
            num_patches = x.shape[1] - prefix
            kept = torch.arange(num_patches, device=x.device).expand(x.shape[0], num_patches)
        if self.attention_keep_rate >= 1:
            return x, None, kept if pruned else None
        suffix = x.shape[1] - prefix - kept.shape[1]
        mask = build_attention_mask(attention, kept, self.attention_keep_rate, prefix, suffix)
        links = build_links(mask, self.sparsity.attention.kernel, patch_link_density(mask, prefix, suffix),
                            query_dtype(x))
        return x, links, kept if pruned else None


def query_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a block's queries will have for tokens ``x``: autocast's where it is on, else the tokens'."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _unchanged(x: torch.Tensor, attention: torch.Tensor,
               links: Links | None) -> tuple[torch.Tensor, Links | None, torch.Tensor | None]:
    """The router of a block that only records its [CLS] attention."""
    return x, links, None


class TriLevelViT(VisionTransformer):
    """timm's ``VisionTransformer`` whose blocks always run through :class:`RoutedBlocks`.

    timm's own activation checkpointing (``checkpoint_seq``) and its per-block loops would run the
    blocks one by one, dense, skipping the routing: here ``set_grad_checkpointing`` turns on the
    routed blocks' own checkpointing, and the paths that cannot keep the routing raise.
    """

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blocks.grad_checkpointing = enable
        dcal = getattr(self, "dcal", None)
        if dcal is not None and dcal.glca is not None:
            dcal.glca.grad_checkpointing = enable

    def forward(self, x, taps=None):  # noqa: ANN001, ANN201 - unannotated: torch.fx copies annotations into the
        # code it generates, and under ``from __future__ import annotations`` they are strings TorchScript cannot read
        """timm's forward on the images; with ``taps`` (a :class:`TapRequest`) it returns ``(logits, Tapped)``.

        The routing builds its own masks, so ``torch.fx`` traces the images alone (a traced ``taps`` is
        no request: the ``isinstance`` test keeps the graph timm's)."""
        recorder = TapRecorder(taps, len(self.blocks)) if isinstance(taps, TapRequest) else None
        return answer(self.forward_head(self.features(x, recorder)), recorder)

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` scripts: at keep rates 1.0 the model computes timm's ViT, so timm's own class
        with these weights (the same outputs); the routing itself cannot be scripted, and says so."""
        routed = [what for what, present in (
            ("tokens or attention at keep rates below 1.0", self.blocks.active),
            ("semantic tokens (sparsity.semantic)", self.blocks.semantic is not None),
            ("DCAL's branches (model.dcal)", hasattr(self, "dcal"))) if present]
        if routed:
            raise RuntimeError(f"TorchScript cannot script trivit's routing ({', '.join(routed)}): it changes the "
                               "token set inside the forward pass. Use torch.compile (or torch.fx at fixed keep "
                               "rates), or script the model at keep rates 1.0 (set_keep_rates(model, 1.0, 1.0)), "
                               "or load its weights (trivit export) into timm's class and script that")
        return as_timm(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The token sequence the blocks take: patch embedding, position embedding and prefix tokens."""
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a trivit ViT builds its attention masks itself (the attention level); "
                             "forward_features takes no attn_mask or is_causal")
        return self.features(x)

    def features(self, x: torch.Tensor, recorder: TapRecorder | None = None) -> torch.Tensor:
        """:meth:`forward_features` of images ``x``, recording what ``recorder`` asks for."""
        return self.norm(self.blocks(self.embed(x), getattr(self, "global_centres", None), recorder))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        semantic = self.blocks.semantic
        if semantic is None or semantic.config.head == "cls":
            return super().forward_head(x, pre_logits)
        x = self.head_drop(self.fc_norm(x.mean(dim=1)))  # semantic tokens, head 'gap': the mean of the final tokens
        return x if pre_logits else self.head(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | ({"global_centres"} if hasattr(self, "global_centres") else set())

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        if self.blocks.active:
            raise RuntimeError("forward_intermediates runs the blocks one by one, which would skip the token and "
                               "attention levels; call set_keep_rates(model, 1.0, 1.0) first for dense features")
        return super().forward_intermediates(*args, **kwargs)


class TriLevelViTDistilled(TriLevelViT, VisionTransformerDistilled):
    """DeiT's ``VisionTransformerDistilled`` (a [CLS] and a distillation token, two heads) with routed blocks.

    The distillation token is a prefix token: always kept, never ranked, never masked."""


ROUTED_CLASSES = {VisionTransformer: TriLevelViT, VisionTransformerDistilled: TriLevelViTDistilled}
"""The timm class of each model trivit routes, and the subclass its instance becomes."""


def as_timm(model: TriLevelViT) -> VisionTransformer:
    """A copy of ``model`` as timm's own class (plain ``Block``s in an ``nn.Sequential``), sharing nothing with it:
    what the model computes at keep rates 1.0, in a form timm's tools (TorchScript) take."""
    plain = copy.deepcopy(model)
    plain.__class__ = next(timm_class for timm_class, routed in ROUTED_CLASSES.items() if isinstance(model, routed))
    blocks = list(plain.blocks)
    for block in blocks:
        block.__class__ = Block
    plain.blocks = nn.Sequential(*blocks)
    return plain


def set_keep_rates(model: nn.Module, tokens: float, attention: float) -> None:
    """Set the current token and attention keep rates of a model built by :func:`create_vit`.

    The model starts at the configured targets; the engine's schedule calls this every step
    (1.0 turns a level off). Evaluation uses whatever rates are current.
    """
    blocks = model.blocks
    if not isinstance(blocks, RoutedBlocks):
        raise TypeError("set_keep_rates needs a model built by trivit.sparse.create_vit")
    if not (0 < tokens <= 1 and 0 < attention <= 1):
        raise ValueError(f"keep rates must lie in (0, 1], got tokens={tokens}, attention={attention}")
    blocks.token_keep_rate, blocks.attention_keep_rate = float(tokens), float(attention)


def create_vit(name: str, sparsity: SparsityConfig | Mapping[str, Any] | None = None, **timm_kwargs: Any) -> TriLevelViT:
    """Build timm ViT ``name`` (with timm's overrides) whose blocks carry the sparsity levels.

    ``sparsity`` is a :class:`SparsityConfig` or the same as a plain nested dict; None means dense.
    """
    config = sparsity if isinstance(sparsity, SparsityConfig) else _sparsity_from_mapping(sparsity)
    if timm_kwargs.get("features_only"):
        raise ValueError(f"features_only: trivit builds the routed classifier. For a feature backbone use "
                         f"timm.create_model('{name}', features_only=True, pretrained_cfg_overlay={{'file': ...}}) "
                         "with the weights trivit export writes, or this model's forward_intermediates at keep "
                         "rates 1.0")
    _check_plain_vit(name, timm_kwargs)
    model = _create_timm(name, block_fn=TriLevelBlock, **timm_kwargs)
    _check_sparsity_fits(model, config)
    model.blocks = RoutedBlocks(model.blocks, config, model.num_prefix_tokens, model.patch_embed.grid_size)
    if config.semantic.enabled and config.semantic.global_centres:
        model.global_centres = nn.Parameter(torch.zeros(1, config.semantic.num_tokens, model.embed_dim))
        nn.init.trunc_normal_(model.global_centres, std=0.02)  # as timm initialises its cls_token
    model.__class__ = ROUTED_CLASSES[type(model)]
    return model


def _sparsity_from_mapping(sparsity: Mapping[str, Any] | None) -> SparsityConfig:
    try:
        return from_dict(SparsityConfig, sparsity)
    except ConfigError as error:
        raise error.under("sparsity") from None


def _check_sparsity_fits(model: VisionTransformer, config: SparsityConfig) -> None:
    depth = len(model.blocks)
    if config.semantic.enabled:
        check_semantic_fits(config.semantic, depth, model.patch_embed.num_patches, model.num_prefix_tokens,
                            config.tokens.keep_rate, config.attention.keep_rate, config.tokens.resolved_locations(depth),
                            config.tokens.fuse)
    if config.tokens.keep_rate == 1 and config.attention.keep_rate == 1:
        return
    beyond = [i for i in config.tokens.resolved_locations(depth) if i >= depth]
    if beyond:
        raise ConfigError("sparsity.tokens.locations", f"got {config.tokens.locations}; blocks {beyond} do not exist "
                                                       f"(the model has {depth} blocks, indices 0..{depth - 1})")
    if getattr(model, "cls_token", None) is None:
        raise ConfigError("sparsity.tokens.keep_rate", "tokens are ranked by [CLS] attention, but this model has no "
                                                       "class token; use a ViT with class_token=True")


def _create_timm(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model``; any name it accepts works, pretrained tags included ('vit_base_patch16_224.augreg_in1k')."""
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; any plain ViT name works, e.g. 'deit_tiny_patch16_224'")
    architecture, tag = split_model_name_tag(name)
    tagged = timm.list_pretrained(f"{architecture}.*") if tag else []
    if tag and f"{architecture}.{tag}" not in tagged:
        raise ValueError(f"timm has no pretrained tag {tag!r} for {architecture!r}; its tags: "
                         f"{', '.join(tagged) or 'none'}")
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as error:
        raise ValueError(f"timm model {name!r} does not accept these arguments ({error}); check model.timm_kwargs") from None
    except AssertionError as error:  # timm checks shapes with asserts, e.g. num_heads dividing embed_dim
        raise ValueError(f"timm model {name!r} refuses these arguments ({error or 'an assertion failed'}); check "
                         "model.timm_kwargs (e.g. num_heads must divide embed_dim)") from None


def _check_plain_vit(name: str, timm_kwargs: Mapping[str, Any]) -> None:
    """Reject models whose blocks are not timm's plain ``Block`` + ``Attention``.

    trivit replaces the block class, which would silently change any other architecture.
    The check builds the model on the meta device, so it allocates nothing. When the
    arguments do not fit, a model that is no plain ViT anyway is named as such.
    """
    kwargs = {k: v for k, v in timm_kwargs.items() if k != "pretrained"}
    try:
        with torch.device("meta"):
            reference = _create_timm(name, **kwargs)
    except ValueError:
        with torch.device("meta"):
            if not _is_plain_vit(_create_timm(name)):
                _raise_not_plain(name)
        raise
    if not _is_plain_vit(reference):
        _raise_not_plain(name)


def _is_plain_vit(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return (type(model) in ROUTED_CLASSES and blocks is not None
            and all(type(b) is Block and type(b.attn) is Attention for b in blocks))


def _raise_not_plain(name: str) -> None:
    raise ValueError(f"{name!r} is not a plain ViT (timm VisionTransformer with Block/Attention blocks); "
                     "trivit supports e.g. deit_*_patch16_224, deit_*_distilled_patch16_224 and vit_*_patch16_224"
                     ) from None
