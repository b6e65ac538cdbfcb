"""The pruned architecture (NViT): a ViT whose blocks have widths of their own, routed like any trivit ViT.

timm's ``VisionTransformer`` gives every block the same widths. Global structural pruning leaves
each block its own number of heads, per-head query/key width, per-head value width and MLP
width, and the model one smaller embedding width. :class:`PrunedArch` states those widths (a
run's ``arch.json``); :func:`create_pruned_vit` builds timm's ViT of the base name through
:func:`trivit.sparse.vit.create_vit` and gives each block a :class:`PrunedAttention` and a
:class:`PrunedMlp` of its widths, so the patch embedding, the prefix tokens, the head and the
routing (token, attention and example levels) are those of every trivit ViT. Parameter names
are timm's and, at the base model's widths, so are the shapes: a timm or trivit checkpoint of
the base model loads strictly.

While pruning, units are masked rather than removed (:func:`set_unit_masks`): a masked unit
contributes nothing to the output and its weights receive no gradient. The embedding width is
masked in the LayerNorms, whose statistics are then taken over the kept channels only, so that
:func:`strip_state` (the kept units' weights, for a model of the smaller widths) gives the
masked model's logits exactly.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import LayerNorm, LayerScale, Mlp
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

from trivit.config import ConfigError, from_dict
from trivit.sparse.blocks import head_widths
from trivit.sparse.config import SparsityConfig
from trivit.sparse.vit import TriLevelViT, create_vit

CLASS_PARAMETERS = frozenset({"head.bias", "head_dist.bias"})
"""The parameters tied to no unit: one entry per class."""
WIDTH_KWARGS = frozenset({"embed_dim", "num_heads", "mlp_ratio"})
"""timm's arguments that an architecture file replaces."""
UNIT_KINDS = ("heads", "qk", "v", "mlp")
"""The units of a block: attention heads, per-head query/key channels and value channels (each
shared by the block's heads), MLP hidden units. The model's own kind is ``embed``."""


@dataclass(kw_only=True)
class BlockWidths:
    """One block's widths; ``scale`` multiplies its attention scores (the base model's head_dim ** -0.5,
    kept when query/key channels are pruned, as the masked model computed it)."""

    heads: int
    qk_dim: int
    v_dim: int
    mlp_dim: int
    scale: float

    def __post_init__(self) -> None:
        for name in ("heads", "qk_dim", "v_dim", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"got {getattr(self, name)}; a block keeps at least one unit of each kind")
        if not self.scale > 0:
            raise ConfigError("scale", f"got {self.scale}; the attention scale must be positive")


@dataclass(kw_only=True)
class PrunedArch:
    """A pruned ViT: the timm model it was pruned from, its embedding width and each block's widths."""

    base: str
    embed_dim: int
    blocks: list[BlockWidths]

    def __post_init__(self) -> None:
        self.blocks = [b if isinstance(b, BlockWidths) else from_dict(BlockWidths, b) for b in self.blocks]
        if self.embed_dim < 1 or not self.blocks:
            raise ConfigError("", f"an architecture needs an embedding width >= 1 and blocks; got {self.embed_dim} "
                                  f"and {len(self.blocks)} blocks")

    @classmethod
    def of_vit(cls, name: str, model: nn.Module) -> PrunedArch:
        """The widths of ``model``, a trivit ViT (timm's uniform one, or a pruned one) built from ``name``."""
        return cls(base=name, embed_dim=model.embed_dim, blocks=[
            BlockWidths(heads=b.attn.num_heads, qk_dim=qk, v_dim=v, mlp_dim=b.mlp.fc1.out_features,
                        scale=float(b.attn.scale)) for b in model.blocks for qk, v in [head_widths(b.attn)]])

    def kept(self, masks: Mapping[str, torch.Tensor]) -> PrunedArch:
        """The architecture left when the units ``masks`` zero are removed."""
        return self.with_counts({group: int(mask.count_nonzero()) for group, mask in masks.items()})

    def with_counts(self, counts: Mapping[str, int]) -> PrunedArch:
        """This architecture with the unit counts of :meth:`unit_counts` replaced by ``counts``."""
        return PrunedArch(base=self.base, embed_dim=counts["embed"], blocks=[
            BlockWidths(heads=counts[f"blocks.{i}.heads"], qk_dim=counts[f"blocks.{i}.qk"],
                        v_dim=counts[f"blocks.{i}.v"], mlp_dim=counts[f"blocks.{i}.mlp"], scale=b.scale)
            for i, b in enumerate(self.blocks)])

    def unit_counts(self) -> dict[str, int]:
        """Every group of units (``embed``, ``blocks.<i>.<kind>``) and its size."""
        counts = {"embed": self.embed_dim}
        for i, b in enumerate(self.blocks):
            counts.update({f"blocks.{i}.heads": b.heads, f"blocks.{i}.qk": b.qk_dim, f"blocks.{i}.v": b.v_dim,
                           f"blocks.{i}.mlp": b.mlp_dim})
        return counts

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PrunedArch:
        """Read ``arch.json``; a missing or malformed file is an error that names it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no architecture file {path}; model.arch names the arch.json that `trivit prune` "
                                    "wrote into its run directory")
        try:
            return from_dict(cls, json.loads(path.read_text()))
        except (json.JSONDecodeError, ConfigError) as error:
            raise ValueError(f"{path} is not a pruned architecture ({error})") from None


class PrunedAttention(nn.Module):
    """timm's ``Attention`` (same parameter names) with its own head count and per-head widths.

    The rows of ``qkv`` are the heads' queries, then their keys, then their values, as in timm.
    ``unit_masks`` (heads, qk, v), set while pruning, zero the masked units' queries, keys and
    values, and ``head_mean`` averages a ranking over the kept heads only.
    """

    def __init__(self, dim: int, widths: BlockWidths, qkv_bias: bool, proj_bias: bool, attn_drop: float,
                 proj_drop: float):
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = widths.heads, widths.qk_dim, widths.v_dim
        self.scale = widths.scale
        self.attn_dim = widths.heads * widths.v_dim
        self.qkv = nn.Linear(dim, widths.heads * (2 * widths.qk_dim + widths.v_dim), bias=qkv_bias)
        self.q_norm, self.k_norm, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
        self.gate = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.unit_masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (B, H, L, qk_dim) and v (B, H, L, v_dim) from the qkv projection (B, L, ...), masked units zeroed."""
        heads, qk = self.num_heads, self.num_heads * self.qk_dim
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.split([qk, qk, heads * self.v_dim], -1))
        if self.unit_masks is not None:
            head, qk_mask, v_mask = (m.to(qkv.dtype) for m in self.unit_masks)
            qk_mask = (head[:, None] * qk_mask)[:, None]
            q, k, v = q * qk_mask, k * qk_mask, v * (head[:, None] * v_mask)[:, None]
        return q, k, v

    def head_mean(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` (B, H, rows, L) averaged over the kept heads."""
        if self.unit_masks is None:
            return probs.mean(dim=1)
        head = self.unit_masks[0].to(probs.dtype)
        return (probs * head[:, None, None]).sum(dim=1) / head.sum()


class PrunedMlp(Mlp):
    """timm's ``Mlp`` whose hidden units can be masked (``unit_mask``) while pruning."""

    unit_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        if self.unit_mask is not None:
            x = x * self.unit_mask.to(x.dtype)
        return self.drop2(self.fc2(self.norm(x)))


class MaskedLayerNorm(LayerNorm):
    """timm's ``LayerNorm`` over the kept embedding channels only (``channel_mask``; all when None).

    A masked channel is left out of the mean and variance and comes out as zero, so the channels
    kept see exactly what they would see in the model without the masked ones.
    """

    channel_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.channel_mask
        if mask is None:
            return super().forward(x)
        mask = mask.to(x.dtype)
        kept = mask.sum()
        mean = (x * mask).sum(dim=-1, keepdim=True) / kept
        centred = (x - mean) * mask
        variance = centred.square().sum(dim=-1, keepdim=True) / kept
        return centred * torch.rsqrt(variance + self.eps) * (self.weight * mask) + self.bias * mask


def create_pruned_vit(arch: PrunedArch, sparsity: SparsityConfig | Mapping[str, Any] | None = None,
                      **timm_kwargs: Any) -> TriLevelViT:
    """The trivit ViT of ``arch``: timm's ``arch.base`` at ``arch.embed_dim`` with each block's own widths.

    ``timm_kwargs`` are those of the unpruned model (image and patch size, depth, classes, drop
    rates, ...); the widths they may give (embed_dim, num_heads, mlp_ratio) are the arch's.
    """
    kwargs = {k: v for k, v in timm_kwargs.items() if k not in WIDTH_KWARGS}
    model = create_vit(arch.base, sparsity, embed_dim=arch.embed_dim, num_heads=1, **kwargs)
    if len(model.blocks) != len(arch.blocks):
        raise ValueError(f"arch.json has {len(arch.blocks)} blocks but {arch.base} has {len(model.blocks)}; "
                         "build it with the depth it was pruned at")
    for block, widths in zip(model.blocks, arch.blocks):
        set_block_widths(block, widths)
    for module in model.modules():
        if type(module) is LayerNorm and module.normalized_shape == (arch.embed_dim,):
            module.__class__ = MaskedLayerNorm
    return model


def set_block_widths(block: nn.Module, widths: BlockWidths) -> None:
    """Give a timm ``Block`` (any head count) a new attention and MLP of ``widths``, initialised as timm's."""
    attn, mlp, dim = block.attn, block.mlp, block.norm1.normalized_shape[0]
    block.attn = PrunedAttention(dim, widths, attn.qkv.bias is not None, attn.proj.bias is not None,
                                 attn.attn_drop.p, attn.proj_drop.p)
    block.mlp = PrunedMlp(dim, widths.mlp_dim, act_layer=type(mlp.act), bias=mlp.fc1.bias is not None,
                          drop=mlp.drop1.p)
    for name, module in (("attn", block.attn), ("mlp", block.mlp)):
        for child_name, child in module.named_modules(prefix=name):
            init_weights_vit_timm(child, child_name)


def set_unit_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> None:
    """Mask the units ``masks`` zeroes (groups as :meth:`PrunedArch.unit_counts`); None unmasks them all.

    Masks already set are updated in place, so a compiled model sees the new ones without recompiling.
    """
    for module in model.modules():
        if isinstance(module, MaskedLayerNorm):
            module.channel_mask = _updated(module.channel_mask, None if masks is None else masks["embed"])
    for i, block in enumerate(model.blocks):
        old = block.attn.unit_masks or (None, None, None)
        new = (None,) * 3 if masks is None else tuple(masks[f"blocks.{i}.{k}"] for k in UNIT_KINDS[:3])
        updated = tuple(_updated(a, b) for a, b in zip(old, new))
        block.attn.unit_masks = None if masks is None else updated
        block.mlp.unit_mask = _updated(block.mlp.unit_mask, None if masks is None else masks[f"blocks.{i}.mlp"])


def _updated(current: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    """``new``'s values in ``current`` when it can hold them, else ``new`` itself."""
    if current is None or new is None or current.shape != new.shape or current.device != new.device:
        return None if new is None else new.clone()
    return current.copy_(new)


@dataclass(frozen=True)
class UnitAxis:
    """Along ``dim`` of a parameter, entry ``i`` belongs to unit ``ids[i]`` of ``group`` (-1: to none)."""

    dim: int
    group: str
    ids: torch.Tensor


def add_unit_sums(sums: dict[str, torch.Tensor], values: torch.Tensor, axes: list[UnitAxis]) -> None:
    """Add a parameter's ``values``, summed over each unit's entries along each of its ``axes``, into
    ``sums[group]`` (one float64 entry per unit; on the CPU)."""
    for axis in axes:
        others = [d for d in range(values.dim()) if d != axis.dim]
        per_entry = (values.sum(dim=others) if others else values).cpu()
        tied = axis.ids >= 0
        sums[axis.group].index_add_(0, axis.ids[tied], per_entry[tied])


def unit_axes(model: nn.Module, arch: PrunedArch) -> dict[str, list[UnitAxis]]:
    """Every parameter's axes tied to units: which weights each unit owns, for saliency and stripping.

    Raises if a parameter is tied to no unit: the model would have a part pruning cannot follow.
    """
    embed = torch.arange(arch.embed_dim)
    axes: dict[str, list[UnitAxis]] = {}

    def tie(name: str, dim: int, group: str, ids: torch.Tensor) -> None:
        axes.setdefault(name, []).append(UnitAxis(dim, group, ids))

    for name in ("cls_token", "reg_token", "dist_token", "pos_embed", "global_centres"):
        if isinstance(getattr(model, name, None), nn.Parameter):
            tie(name, 2, "embed", embed)
    tie("patch_embed.proj.weight", 0, "embed", embed)
    if model.patch_embed.proj.bias is not None:
        tie("patch_embed.proj.bias", 0, "embed", embed)
    for module_name, module in model.named_modules():
        if isinstance(module, MaskedLayerNorm):
            for param in ("weight", "bias"):
                tie(f"{module_name}.{param}", 0, "embed", embed)
        elif isinstance(module, LayerScale):
            tie(f"{module_name}.gamma", 0, "embed", embed)
    for head in ("head", "head_dist"):
        if isinstance(getattr(model, head, None), nn.Linear):
            tie(f"{head}.weight", 1, "embed", embed)
    for i, widths in enumerate(arch.blocks):
        _tie_block(tie, f"blocks.{i}", widths, embed)
    untied = [name for name, _ in model.named_parameters() if name not in axes and name not in CLASS_PARAMETERS]
    if untied:
        raise ValueError(f"cannot prune {arch.base}: parameters {untied} are tied to no prunable unit")
    return axes


def _tie_block(tie: Any, prefix: str, widths: BlockWidths, embed: torch.Tensor) -> None:
    heads, qk, v = widths.heads, widths.qk_dim, widths.v_dim
    none_qk, none_v = torch.full((heads * qk,), -1), torch.full((heads * v,), -1)
    head_of_qk, head_of_v = torch.arange(heads).repeat_interleave(qk), torch.arange(heads).repeat_interleave(v)
    channel_qk, channel_v = torch.arange(qk).repeat(heads), torch.arange(v).repeat(heads)
    qkv_rows = {"heads": torch.cat([head_of_qk, head_of_qk, head_of_v]),
                "qk": torch.cat([channel_qk, channel_qk, none_v]),
                "v": torch.cat([none_qk, none_qk, channel_v])}
    for param in ("weight", "bias"):
        for kind, ids in qkv_rows.items():
            tie(f"{prefix}.attn.qkv.{param}", 0, f"{prefix}.{kind}", ids)
        tie(f"{prefix}.attn.proj.{param}", 0, "embed", embed)
        tie(f"{prefix}.mlp.fc1.{param}", 0, f"{prefix}.mlp", torch.arange(widths.mlp_dim))
        tie(f"{prefix}.mlp.fc2.{param}", 0, "embed", embed)
    tie(f"{prefix}.attn.qkv.weight", 1, "embed", embed)
    tie(f"{prefix}.attn.proj.weight", 1, f"{prefix}.heads", head_of_v)
    tie(f"{prefix}.attn.proj.weight", 1, f"{prefix}.v", channel_v)
    tie(f"{prefix}.mlp.fc1.weight", 1, "embed", embed)
    tie(f"{prefix}.mlp.fc2.weight", 1, f"{prefix}.mlp", torch.arange(widths.mlp_dim))


def kept_entries(axes: list[UnitAxis], dim: int, masks: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Indices along ``dim`` whose units are all kept (None where no axis lies along ``dim``)."""
    along = [axis for axis in axes if axis.dim == dim]
    if not along:
        return None
    keep = torch.ones(len(along[0].ids), dtype=torch.bool)
    for axis in along:
        tied = axis.ids >= 0
        keep[tied] &= masks[axis.group].cpu().bool()[axis.ids[tied]]
    return keep.nonzero().squeeze(1)


def pruned_entries(shape: torch.Size, axes: list[UnitAxis], masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A parameter's entries tied to a masked unit along any of its ``axes`` (a bool tensor of ``shape``)."""
    pruned = torch.zeros(shape, dtype=torch.bool)
    for axis in axes:
        tied = axis.ids >= 0
        along = torch.zeros(len(axis.ids), dtype=torch.bool)
        along[tied] = ~masks[axis.group].cpu().bool()[axis.ids[tied]]
        view = [1] * len(shape)
        view[axis.dim] = -1
        pruned |= along.view(view)
    return pruned


def strip_state(state: Mapping[str, torch.Tensor], axes: Mapping[str, list[UnitAxis]],
                masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masked model's ``state`` with the masked units' weights removed: a state of ``arch.kept(masks)``."""
    stripped = {}
    for name, tensor in state.items():
        tensor_axes = axes.get(name, [])
        for dim in sorted({axis.dim for axis in tensor_axes}):
            tensor = tensor.index_select(dim, kept_entries(tensor_axes, dim, masks).to(tensor.device))
        stripped[name] = tensor.contiguous()
    return stripped
