"""DCAL: dual cross-attention learning (CVPR 2022) beside the ViT's self-attention, for fine-grained classes.

Global-local cross-attention (GLCA): the attention rollout over the self-attention blocks,
R = Sbar_L ... Sbar_1 with Sbar = 0.5 S + 0.5 I (S averaged over the heads), ranks the patches by
its [CLS] row; the top ``glca_top_r`` of them, as queries, attend to every token of the last
block's output in one extra block, with its own weights (initialised from the last block's). The
branch classifies the mean of those local queries' outputs through its own norm and head (copies
of the model's at the start): a [CLS] query's output would not depend on which patches were kept,
since every query attends to all keys on its own. At inference the model returns
log((p_SA + p_GLCA) / 2), the two heads' class probabilities summed (halved, so that it stays a
log-probability; the argmax is the sum's).

Pair-wise cross-attention (PWCA), training only: a second stream through the same blocks, whose
queries attend, under one softmax, to their own keys and values and to those of a distractor
image of the same batch (the self-attention stream's, at the same depth); it is classified by
the model's own norm and head, with the image's own label.

The three losses are weighted by learned uncertainty, 1/2 sum_k (exp(-w_k) L_k + w_k)
(engine/objectives/dcal.py); the w_k are a parameter of the model, so every backend trains,
averages and checkpoints them with it. Everything DCAL adds is under ``dcal.``, outside timm's
state_dict: ``trivit export`` writes the backbone and, beside it, the GLCA branch.
"""
from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from trivit.config import ConfigError, check
from trivit.methods import check_methods, sparsity_methods, sparsity_values
from trivit.sparse.blocks import checkpointed
from trivit.sparse.taps import Tapped, TapRecorder, TapRequest, answer
from trivit.sparse.tokens import kept_count

if TYPE_CHECKING:
    from trivit.sparse.vit import RoutedBlocks, TriLevelViT

BRANCH_PREFIX = "dcal."
"""The state_dict entries DCAL adds to the model."""
GLCA_PREFIX = "dcal.glca."
"""The GLCA branch's entries (its block, norm and head): what ``trivit export`` writes beside the backbone."""


@dataclass(kw_only=True)
class DCALConfig:
    """Dual cross-attention learning; ``glca_top_r: 0`` and ``pwca: false`` (the defaults) turn it off."""

    glca_top_r: float = 0.0
    """Fraction of the patches GLCA keeps as queries, by the rollout's [CLS] row (the paper: 0.1); 0 = no GLCA."""
    pwca: bool = False
    """Pair-wise cross-attention with a distractor from the same batch, in training only."""

    def __post_init__(self) -> None:
        check(0 <= self.glca_top_r <= 1, "glca_top_r", self.glca_top_r, "a fraction in [0, 1] (0 = off; the paper 0.1)")
        check(isinstance(self.pwca, bool), "pwca", self.pwca, "true or false")

    @property
    def enabled(self) -> bool:
        return self.glca_top_r > 0 or self.pwca

    @property
    def branches(self) -> int:
        """The losses the uncertainty weights balance: self-attention, plus GLCA and PWCA where on."""
        return 1 + (self.glca_top_r > 0) + self.pwca


class DCALOutputs(NamedTuple):
    """What a DCAL model returns in training (a NamedTuple: FSDP2 and torch.compile see through it)."""

    logits: torch.Tensor
    """The self-attention head's (what the example level scores)."""
    glca: torch.Tensor | None
    pwca: torch.Tensor | None
    log_vars: torch.Tensor
    """The uncertainty weights w_k: self-attention, then GLCA and PWCA where on."""


class UncertaintyWeights(nn.Module):
    """The learned w_k of 1/2 sum_k (exp(-w_k) L_k + w_k), zero at the start (every loss weighted 1/2)."""

    def __init__(self, count: int):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(count))

    def forward(self) -> torch.Tensor:
        """A copy: under ZeRO-3 the parameter itself is released again after this module's forward."""
        return self.log_vars.clone()


class GLCABranch(nn.Module):
    """GLCA's block, norm and head; copies of the model's last block, final norm and head at the start."""

    def __init__(self, model: TriLevelViT, top_r: float):
        super().__init__()
        self.top_r = top_r
        self.block = copy.deepcopy(model.blocks[-1])
        self.norm = copy.deepcopy(model.norm)
        self.head = copy.deepcopy(model.head)
        self.grad_checkpointing = False

    @torch.no_grad()
    def copy_from(self, model: TriLevelViT) -> None:
        """Take the model's current last block, norm and head (after ``model.init_from`` loaded them)."""
        for mine, theirs in ((self.block, model.blocks[-1]), (self.norm, model.norm), (self.head, model.head)):
            mine.load_state_dict(theirs.state_dict())

    def forward(self, tokens: torch.Tensor, scores: torch.Tensor, num_prefix_tokens: int,
                head_drop: nn.Module) -> torch.Tensor:
        """Logits from the top-scored patches of ``tokens`` (B, L, D) attending to all of ``tokens``.

        ``scores`` (B, N): the rollout's [CLS] row over the N patches."""
        patches = tokens[:, num_prefix_tokens:]
        index = scores.topk(kept_count(patches.shape[1], self.top_r), dim=-1).indices
        queries = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        local = checkpointed(self.grad_checkpointing, self.block.forward_cross, queries, tokens)
        return self.head(head_drop(self.norm(local).mean(dim=1)))


class DualCrossAttention(nn.Module):
    """What DCAL adds to a model (``model.dcal``): the GLCA branch and the uncertainty weights."""

    def __init__(self, config: DCALConfig, model: TriLevelViT):
        super().__init__()
        self.config = config
        self.glca = GLCABranch(model, config.glca_top_r) if config.glca_top_r > 0 else None
        self.loss_weights = UncertaintyWeights(config.branches)


class DCALForward:
    """What ``add_dcal`` mixes into a model's class: a forward that also takes PWCA's pairs and runs the branches.
    (The plain model's forward takes the images alone, as timm's, which ``torch.fx`` traces.)"""

    def forward(self, x: torch.Tensor, distractors: torch.Tensor | None = None,
                taps: TapRequest | None = None) -> DCALOutputs | torch.Tensor | tuple[Any, Tapped]:
        recorder = TapRecorder(taps, len(self.blocks)) if isinstance(taps, TapRequest) else None
        return answer(forward_dcal(self, x, distractors, recorder), recorder)


def add_dcal(model: TriLevelViT, config: DCALConfig) -> None:
    """Give ``model`` (built by ``create_vit``) DCAL's branches; raises on a model or setting it cannot compose with."""
    check_dcal_fits(model, config)
    model.dcal = DualCrossAttention(config, model)
    model.__class__ = dcal_class(type(model))


_DCAL_CLASSES: dict[type, type] = {}


def dcal_class(base: type) -> type:
    """``base`` with :class:`DCALForward` mixed in (one class per base)."""
    if base not in _DCAL_CLASSES:
        _DCAL_CLASSES[base] = type(f"{base.__name__}DCAL", (DCALForward, base), {"__module__": __name__})
    return _DCAL_CLASSES[base]


def check_dcal_fits(model: TriLevelViT, config: DCALConfig) -> None:
    sparsity = model.blocks.sparsity
    check_methods(["dcal", *sparsity_methods(sparsity)], sparsity_values(sparsity))  # the one table (trivit/methods.py)
    if getattr(model, "cls_token", None) is None:
        raise ConfigError("model.dcal", "GLCA ranks patches by the rollout's [CLS] row, but this model has no class "
                                        "token; use a ViT with class_token=True")
    if hasattr(model, "head_dist"):
        raise ConfigError("model.dcal", "a deit_*_distilled model's distillation token and second head have no place "
                                        "in DCAL's branches; use the model without distillation token")


def forward_dcal(model: TriLevelViT, images: torch.Tensor, distractors: torch.Tensor | None = None,
                 recorder: TapRecorder | None = None) -> DCALOutputs | torch.Tensor:
    """The model's forward with DCAL: :class:`DCALOutputs` in training, log((p_SA + p_GLCA) / 2) (or the
    self-attention logits without GLCA) in evaluation.

    ``distractors`` (B,): the index in the batch of each image's PWCA distractor; None draws a random
    derangement (the trainer passes :func:`keyed_distractors`)."""
    blocks, dcal = model.blocks, model.dcal
    if blocks.active:
        raise RuntimeError("a DCAL model runs at keep rates 1.0 (its rollout needs every token); call "
                           "set_keep_rates(model, 1.0, 1.0)")
    pairs = model.training and dcal.config.pwca
    if not pairs and dcal.glca is None:  # PWCA alone, in evaluation: the plain model
        return model.forward_head(model.features(images, recorder))
    if pairs and distractors is None:
        distractors = random_distractors(images.shape[0], images.device)
    x = model.embed(images)
    tokens, paired, attentions = run_blocks(blocks, x, x if pairs else None, distractors, recorder)
    logits = model.forward_head(model.norm(tokens))
    glca = None
    if dcal.glca is not None:
        prefix = blocks.num_prefix_tokens
        glca = dcal.glca(tokens, rollout_cls_row(attentions)[:, prefix:], prefix, model.head_drop)
    if not model.training:
        return logits if glca is None else summed_probabilities(logits, glca)
    pwca = model.forward_head(model.norm(paired)) if pairs else None
    return DCALOutputs(logits, glca, pwca, dcal.loss_weights())


def run_blocks(blocks: RoutedBlocks, x: torch.Tensor, paired: torch.Tensor | None, distractors: torch.Tensor | None,
               recorder: TapRecorder | None = None) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """Every block on the self-attention stream ``x`` and the PWCA stream ``paired`` (None: none);
    returns both outputs and each block's head-averaged attention (B, L, L), detached.

    ``recorder`` takes what the caller asked for from the self-attention stream, as the routed blocks do."""
    attentions = []
    blocks.tokens_per_block, blocks.attention_density = [], {}
    recorder = recorder or TapRecorder(None, len(blocks))
    for index, block in enumerate(blocks):
        x, paired, attention = checkpointed(blocks.grad_checkpointing, block.forward_paired, x, paired, distractors)
        attentions.append(attention)
        recorder.record(index, x, attention[:, 0, blocks.num_prefix_tokens:])
        blocks.tokens_per_block.append(x.shape[1])
    return x, paired, attentions


@torch.no_grad()
def rollout_cls_row(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """The [CLS] row (B, L) of the rollout R = Sbar_L ... Sbar_1, Sbar = 0.5 S + 0.5 I, of the head-averaged
    attentions S (B, L, L) in block order: e_0^T times the factors from the last block down, O(L^2) each."""
    row = torch.zeros_like(attentions[-1][:, 0])
    row[:, 0] = 1
    for attention in reversed(attentions):
        row = 0.5 * (row.unsqueeze(1) @ attention).squeeze(1) + 0.5 * row
    return row


def summed_probabilities(logits: torch.Tensor, glca_logits: torch.Tensor) -> torch.Tensor:
    """log((softmax(logits) + softmax(glca_logits)) / 2), in fp32 (or wider)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    both = torch.stack([logits.to(dtype).log_softmax(dim=-1), glca_logits.to(dtype).log_softmax(dim=-1)])
    return both.logsumexp(dim=0) - math.log(2.0)


def cyclic_distractors(order: torch.Tensor) -> torch.Tensor:
    """Distractor indices pairing image ``order[i]`` with image ``order[i + 1]``, the last with the first:
    nobody is their own distractor (for two images or more)."""
    distractors = torch.empty_like(order)
    distractors[order] = order.roll(-1)
    return distractors


def random_distractors(batch: int, device: torch.device) -> torch.Tensor:
    """A random derangement of the batch from torch's generator."""
    if batch < 2:
        raise ValueError(f"PWCA pairs each image with another image of its batch, but the batch has {batch}")
    return cyclic_distractors(torch.randperm(batch, device=device))


def keyed_distractors(ids: Sequence[int], step: int, seed: int) -> torch.Tensor:
    """A derangement drawn from a hash of (seed, step, sample id): the same pairs for the same micro-batch
    whichever rank, world size or resumed run holds it."""
    if len(ids) < 2:
        raise ValueError(f"PWCA pairs each image with another image of its micro-batch, but it has {len(ids)}")
    keys = [hashlib.blake2b(f"{seed}/{step}/{sample}".encode(), digest_size=8).digest() for sample in ids]
    return cyclic_distractors(torch.tensor(sorted(range(len(ids)), key=keys.__getitem__)))


def entries_under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` whose names start with ``prefix``, without it."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def split_branch(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the backbone's entries, DCAL's entries without their ``dcal.`` prefix) of a model's state."""
    backbone = {key: value for key, value in state.items() if not key.startswith(BRANCH_PREFIX)}
    return backbone, entries_under(state, BRANCH_PREFIX)
