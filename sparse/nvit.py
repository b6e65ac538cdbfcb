"""NViT's pruning decisions: the Hessian-aware saliency of every unit, and the groups of units to remove next.

Saliency of unit u (the second-order Taylor estimate of the loss change from removing it, with the
Fisher approximation of the Hessian): ``c_u = mean over batches of (sum over the weights tied to u
of theta * dL/dtheta / d_kind)^2``. Two readings (``prune.saliency``):

- ``paper``: the weights tied to a unit are all of :func:`unit_axes` (a head's Q/K/V rows and its
  output projection's columns, an MLP unit's fc1 row and fc2 column, an embedding channel in every
  tensor it spans, [CLS], position embedding, LayerNorms and head included), d = 1, and each kind
  (embedding channels, heads, query/key channels, value channels, MLP units) is normalised by its
  sum over the kept units: a unit's share of its kind's saliency, so that a head (one of 16 in a
  4-block demo model) weighs as much as the 64 MLP units (of 1,024) that hold as many weights.
  Scores restart at each pruning step.
- ``code``: what the authors' code sums (NVlabs/NViT, ``pruning_engine_general.py``, method 23, and
  ``model_pruning.py``): :func:`code_saliency_axes`, the fixed divisors :data:`CODE_DIVISORS` before
  squaring and no normalisation, and scores that are a moving average over pruning steps
  (:data:`CODE_MOMENTUM`).

Units are removed in groups of the same kind and block (the embedding's span all blocks): a
layer's candidate is its ``size`` lowest-saliency kept units, scored by their summed normalised
saliency less ``latency_weight`` times the latency removing them saves as a fraction of the
unpruned model's: a share of a kind's saliency against a share of the latency (``prune.latency_weight``
0.25 by default, the better of 1 and 0.25 on the demo). One global ranking picks the lowest-scoring candidate, the
candidates are scored again at the new widths, and so on until the pruning step's latency budget
is spent. Every layer keeps at least one group, and ``prune.min_widths`` of its kind's unpruned width.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trivit.sparse.latency import LatencyTable
from trivit.sparse.pruned import PrunedArch, UnitAxis, add_unit_sums

KINDS = ("embed", "heads", "qk", "v", "mlp")
GROUP_FRACTIONS = {"embed": 1 / 48, "heads": 1 / 6, "qk": 1 / 8, "v": 1 / 8, "mlp": 1 / 192}
"""Group size as a fraction of the unpruned width: the authors' DeiT-B groups (embedding 16 of 768,
heads 2 of 12, query/key and value channels 8 of 64, MLP units 16 of 3072), scaled to any model."""


def kind_of(group: str) -> str:
    """The unit kind of a group name (``embed`` or ``blocks.<i>.<kind>``)."""
    return group.rsplit(".", 1)[-1]


def group_sizes(arch: PrunedArch) -> dict[str, int]:
    """Units per group of each kind for the unpruned ``arch`` (at least 1)."""
    first = arch.blocks[0]
    widths = {"embed": arch.embed_dim, "heads": first.heads, "qk": first.qk_dim, "v": first.v_dim,
              "mlp": first.mlp_dim}
    return {kind: max(1, int(widths[kind] * GROUP_FRACTIONS[kind])) for kind in KINDS}


CODE_DIVISORS = {"embed": 12.0, "heads": 12.0, "qk": 2.0, "v": 2.0, "mlp": 1.0}
"""``saliency: code``: each kind's per-unit sum is divided by these before squaring (the code's /12 for the
embedding, /6 and /2 for heads, /2 for query/key and value channels, none for MLP units)."""
CODE_MOMENTUM = 0.9
"""``saliency: code``: the scores at a pruning step are 0.9 x the previous step's + 0.1 x this step's mean."""

_CODE_SUMS = {
    ("patch_embed.proj.weight", 0): {"embed"}, ("patch_embed.proj.bias", 0): {"embed"},
    ("attn.qkv.weight", 0): {"heads", "qk", "v"}, ("attn.qkv.bias", 0): {"heads", "qk", "v"},
    ("attn.qkv.weight", 1): {"embed"},
    ("attn.proj.weight", 0): {"embed"}, ("attn.proj.bias", 0): {"embed"},
    ("mlp.fc1.weight", 0): {"mlp"}, ("mlp.fc1.bias", 0): {"mlp"}, ("mlp.fc1.weight", 1): {"embed"},
    ("mlp.fc2.weight", 0): {"embed"}, ("mlp.fc2.bias", 0): {"embed"},
}
"""(parameter, axis) -> the kinds whose saliency the authors' code reads there."""


def code_saliency_axes(axes: Mapping[str, list[UnitAxis]]) -> dict[str, list[UnitAxis]]:
    """The subset of :func:`unit_axes` the authors' code sums per unit: a head's Q/K/V rows (not the output
    projection's columns); a query/key channel's Q rows (the K rows are pruned with them, not scored); a
    value channel's V rows; an MLP unit's fc1 row; an embedding channel's patch-embedding, attention-output
    and fc2 rows and its Q/K/V and fc1 columns (not [CLS], position embedding, LayerNorms nor the head)."""
    kept: dict[str, list[UnitAxis]] = {}
    for name, param_axes in axes.items():
        for axis in param_axes:
            kind = kind_of(axis.group)
            if not any(name.endswith(suffix) and dim == axis.dim and kind in kinds
                       for (suffix, dim), kinds in _CODE_SUMS.items()):
                continue
            ids = axis.ids
            if kind == "qk":  # the rows are [Q, K, V]: keep Q's channel ids only
                tied = (ids >= 0).nonzero().squeeze(1)
                ids = ids.clone()
                ids[tied[len(tied) // 2:]] = -1
            kept.setdefault(name, []).append(UnitAxis(axis.dim, axis.group, ids))
    return kept


class SaliencyMeter:
    """Accumulates every unit's Hessian-aware saliency over batches; ``divisors`` per kind divide each unit's
    sum before it is squared (default 1)."""

    def __init__(self, axes: Mapping[str, list[UnitAxis]], counts: Mapping[str, int],
                 divisors: Mapping[str, float] | None = None):
        self.axes = axes
        self.divisors = dict(divisors or {})
        self.counts = dict(counts)
        self.totals = {group: torch.zeros(size, dtype=torch.float64) for group, size in counts.items()}
        self.batches = 0

    def add(self, parameters: Iterable[tuple[str, torch.Tensor, torch.Tensor | None]]) -> None:
        """One batch: ``(name, theta, dL/dtheta)`` of every parameter (full tensors, the same on every rank)."""
        sums = {group: torch.zeros_like(total) for group, total in self.totals.items()}
        for name, theta, grad in parameters:
            if grad is None or name not in self.axes:
                continue
            add_unit_sums(sums, theta.detach().double() * grad.detach().double(), self.axes[name])
        for group, total in self.totals.items():
            total += (sums[group] / self.divisors.get(kind_of(group), 1.0)).square()
        self.batches += 1

    def saliency(self) -> dict[str, torch.Tensor]:
        """The mean over the batches added since the last reset."""
        return {group: total / max(self.batches, 1) for group, total in self.totals.items()}

    def reset(self) -> None:
        for total in self.totals.values():
            total.zero_()
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {"totals": {g: t.clone() for g, t in self.totals.items()}, "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.totals = {g: t.clone().to(torch.float64) for g, t in state["totals"].items()}
        self.batches = int(state["batches"])


def normalised(saliency: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each kind's saliency over its sum among the kept units of that kind (all blocks together)."""
    totals = {}
    for kind in KINDS:
        kept = [saliency[g][masks[g].bool()] for g in saliency if kind_of(g) == kind]
        total = torch.cat(kept).sum() if kept else torch.zeros((), dtype=torch.float64)
        totals[kind] = total if total > 0 else torch.tensor(1.0, dtype=torch.float64)
    return {g: s / totals[kind_of(g)] for g, s in saliency.items()}


@dataclass(frozen=True)
class Choice:
    """A group of units removed: their indices in ``group``, their summed normalised saliency and the latency (ms) saved."""

    group: str
    units: tuple[int, ...]
    saliency: float
    saved_ms: float


def floor_units(arch: PrunedArch, sizes: Mapping[str, int], min_widths: Mapping[str, float]) -> dict[str, int]:
    """Per kind, the fewest units a layer may keep: ``min_widths`` of the unpruned width, at least one group."""
    full = {"embed": arch.embed_dim, "heads": arch.blocks[0].heads, "qk": arch.blocks[0].qk_dim,
            "v": arch.blocks[0].v_dim, "mlp": arch.blocks[0].mlp_dim}
    return {kind: max(sizes[kind], math.ceil(min_widths.get(kind, 0.0) * full[kind])) for kind in KINDS}


def floor_arch(arch: PrunedArch, sizes: Mapping[str, int], floors: Mapping[str, int]) -> PrunedArch:
    """The smallest architecture pruning can reach: every layer as few groups as its floor allows."""
    counts = {}
    for group, full in arch.unit_counts().items():
        size = sizes[kind_of(group)]
        counts[group] = full - size * max(0, (full - floors[kind_of(group)]) // size)
    return arch.with_counts(counts)


def choose_groups(scores: Mapping[str, torch.Tensor], masks: dict[str, torch.Tensor], arch: PrunedArch,
                  sizes: Mapping[str, int], table: LatencyTable, latency_weight: float,
                  budget_ms: float, floors: Mapping[str, int] | None = None) -> list[Choice]:
    """Remove (in ``masks``, in place) the lowest-scoring groups until ``budget_ms`` of latency is saved.

    ``scores``: normalised saliency of the unpruned ``arch``'s units; ``masks`` the current ones. A
    group's score is its units' summed saliency less ``latency_weight`` x the latency its removal
    saves as a fraction of ``arch``'s. A layer gives up no group below its kind's ``floors`` (units;
    default: one group). Stops early when no layer can give up a group.
    """
    floors = floors or dict(sizes)
    base_ms = table.model_ms(arch)
    chosen: list[Choice] = []
    candidates: dict[str, Choice | None] = {group: None for group in masks}
    stale = set(masks)
    saved = 0.0
    while saved < budget_ms:
        widths = [_widths(block, arch.kept(masks).embed_dim) for block in arch.kept(masks).blocks]
        for group in stale:
            candidates[group] = _candidate(group, scores[group], masks[group], sizes[kind_of(group)],
                                           floors[kind_of(group)], widths, table)
        ready = [c for c in candidates.values() if c is not None]
        if not ready:
            break
        best = min(ready, key=lambda c: c.saliency - latency_weight * c.saved_ms / base_ms)
        masks[best.group][list(best.units)] = 0
        chosen.append(best)
        saved += best.saved_ms
        block = best.group.split(".")[1] if best.group != "embed" else None
        stale = {g for g in masks if block is None or g == "embed" or g.split(".")[1] == block}
    return chosen


WIDTH_INDEX = {"embed": 0, "heads": 1, "qk": 2, "v": 3, "mlp": 4}
"""Where each kind sits in a block's (embed, heads, qk, v, mlp) widths."""


def _widths(block: Any, embed: int) -> tuple[int, int, int, int, int]:
    return embed, block.heads, block.qk_dim, block.v_dim, block.mlp_dim


def _candidate(group: str, scores: torch.Tensor, mask: torch.Tensor, size: int, floor: int,
               widths: list[tuple[int, ...]], table: LatencyTable) -> Choice | None:
    """``group``'s ``size`` lowest-scoring kept units, or None if giving them up would leave fewer than ``floor``."""
    kept = mask.bool().nonzero().squeeze(1)
    if len(kept) - size < max(floor, size):
        return None
    units = kept[scores[kept].argsort(stable=True)[:size]]
    kind = kind_of(group)
    affected = widths if group == "embed" else [widths[int(group.split(".")[1])]]
    saved = 0.0
    for block in affected:
        narrower = list(block)
        narrower[WIDTH_INDEX[kind]] -= size
        saved += table.block_ms(*block) - table.block_ms(*narrower)
    return Choice(group, tuple(units.tolist()), float(scores[units].sum()), saved)
