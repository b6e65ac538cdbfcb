"""Attention level and the routed blocks against float64 references written in the test."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from trivit.sparse import create_vit, set_keep_rates
from trivit.sparse.attention import build_attention_mask


def reference_mask(attention, kept, keep_rate, prefix, suffix):
    """The reference code's rule, row by row: keep every link >= the row's k-th largest value (ties kept)."""
    batch, num_kept = kept.shape
    length = prefix + num_kept + suffix
    mask = torch.ones(batch, length, length, dtype=torch.bool)
    keep = math.ceil(num_kept * keep_rate)
    for b in range(batch):
        for qi, q in enumerate(kept[b].tolist()):
            scores = [float(attention[b, prefix + q, prefix + k]) for k in kept[b].tolist()]
            threshold = sorted(scores, reverse=True)[keep - 1]
            for kj in range(num_kept):
                mask[b, prefix + qi, prefix + kj] = scores[kj] >= threshold
    return mask


def hand_worked_attention() -> torch.Tensor:
    """[CLS] + 6 patches; patches 1, 2, 3, 4, 5 are kept (patch 0 was dropped).

    Query patch 1 attends to kept keys 1..5 with 0.4, 0.2, 0.2, 0.1, 0.05: at keep rate 0.4
    (k = ceil(5 x 0.4) = 2) the 2nd largest value is 0.2, shared by keys 2 and 3, so 3 links stay.
    Query patch 2 attends to kept keys 1..5 with 0, 0.6, 0, 0, 0 (the rest went to [CLS] and the
    dropped patch 0, as under an earlier mask): one non-zero value for k = 2, so the threshold
    is 0 and all 5 links stay.
    """
    attention = torch.zeros(1, 7, 7, dtype=torch.float64)
    attention[0, 2, 2:] = torch.tensor([0.4, 0.2, 0.2, 0.1, 0.05], dtype=torch.float64)
    attention[0, 2, 0:2] = 0.05
    attention[0, 3, 3] = 0.6
    attention[0, 3, 0:2] = 0.2
    for query in (4, 5, 6):
        attention[0, query, 2:] = torch.tensor([0.5, 0.3, 0.1, 0.07, 0.03], dtype=torch.float64)
    return attention


def test_ties_at_the_threshold_are_all_kept():
    mask = build_attention_mask(hand_worked_attention(), torch.tensor([[1, 2, 3, 4, 5]]), 0.4, 1, 0)[0, 0]
    patch_rows = mask[1:, 1:]
    assert patch_rows[0].tolist() == [True, True, True, False, False], "0.4 and both 0.2s: the tie is kept"
    for row in patch_rows[2:]:
        assert row.tolist() == [True, True, False, False, False], "no tie: exactly k = 2 links"


def test_a_row_with_fewer_than_k_nonzero_links_keeps_every_tied_zero():
    mask = build_attention_mask(hand_worked_attention(), torch.tensor([[1, 2, 3, 4, 5]]), 0.4, 1, 0)[0, 0]
    assert mask[2, 1:].all(), "one non-zero link for k = 2: the threshold is 0 and every link stays"
    assert mask[:, 0].all() and mask[0].all(), "[CLS] always sees and is seen"


@pytest.mark.parametrize("keep_rate, prefix, suffix", [(0.2, 1, 0), (0.5, 1, 1), (0.3, 2, 0)])
def test_mask_matches_the_reference(keep_rate, prefix, suffix):
    generator = torch.Generator().manual_seed(1)
    attention = torch.rand(2, prefix + 30, prefix + 30, dtype=torch.float64, generator=generator).softmax(-1)
    kept = torch.stack([torch.randperm(30, generator=generator)[:17].sort().values for _ in range(2)])
    mask = build_attention_mask(attention, kept, keep_rate, prefix, suffix)
    assert mask.shape == (2, 1, prefix + 17 + suffix, prefix + 17 + suffix) and not mask.requires_grad
    assert torch.equal(mask[:, 0], reference_mask(attention, kept, keep_rate, prefix, suffix))
    assert mask[:, 0, :, :prefix].all() and mask[:, 0, :prefix, :].all(), "[CLS] is never hidden"


def test_levels_switched_off_at_run_time_give_exactly_the_dense_model():
    """The warm-up of the keep-rate schedule: a model built sparse, run at rates 1.0, is timm's."""
    torch.manual_seed(0)
    dense = timm.create_model("deit_tiny_patch16_224", num_classes=5).eval()
    sparse = create_vit("deit_tiny_patch16_224", {"tokens": {"keep_rate": 0.7}, "attention": {"keep_rate": 0.2}},
                        num_classes=5).eval()
    sparse.load_state_dict(dense.state_dict())
    images = torch.randn(2, 3, 224, 224)
    assert not torch.allclose(sparse(images), dense(images), atol=1e-3), "the sparse rates change the logits"
    set_keep_rates(sparse, tokens=1.0, attention=1.0)
    assert torch.equal(sparse(images), dense(images))


@torch.no_grad()
def reference_forward(model, images):
    """The whole sparse forward in float64 with per-head eager softmax, following method.md."""
    model = model.double()
    blocks = model.blocks
    x = model.norm_pre(model._pos_embed(model.patch_embed(images.double())))
    mask = None
    for index, block in enumerate(blocks):
        attn = block.attn
        h = block.norm1(x)
        b, n, c = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1)
        x = x + attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
        if index in blocks.locations:
            average = probs.mean(1)
            cls_attention = average[:, 0, 1:]
            keep = math.ceil((n - 1) * blocks.token_keep_rate)
            kept = cls_attention.topk(keep, dim=1).indices.sort(dim=1).values
            x = torch.cat([x[:, :1], x[:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, c))], dim=1)
            mask = reference_mask(average, kept, blocks.attention_keep_rate, 1, 0).unsqueeze(1)
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


def test_sparse_forward_matches_the_float64_reference():
    torch.manual_seed(0)
    sparsity = {"tokens": {"keep_rate": 0.7, "locations": [1, 3]}, "attention": {"keep_rate": 0.3}}
    model = create_vit("deit_tiny_patch16_224", sparsity, img_size=64, depth=5, num_classes=4).eval()
    images = torch.randn(3, 3, 64, 64)
    got = model.double()(images.double())
    expected = reference_forward(model, images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_twelve_blocks_at_tokens_0_7_attention_0_2_match_the_reference_rule():
    """deit_tiny at 224 px, the paper's locations: the compounding locations hold many tied rows."""
    torch.manual_seed(0)
    sparsity = {"tokens": {"keep_rate": 0.7}, "attention": {"keep_rate": 0.2}}
    model = create_vit("deit_tiny_patch16_224", sparsity, num_classes=10).eval().double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(5)  # sharper attention than at initialisation, as after training
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    got = model(images)
    density = {block: value.item() for block, value in model.blocks.attention_density.items()}
    torch.testing.assert_close(got, reference_forward(model, images), rtol=0, atol=1e-9)
    assert density[3] == pytest.approx(28 / 138, abs=0.02), "block 3: k = 28 of 138 links per row, few ties"
    assert density[6] > 0.35 and density[9] > 0.25, f"later locations keep their tied zero links: {density}"


def test_gradients_reach_every_parameter_with_all_levels_on():
    torch.manual_seed(0)
    sparsity = {"tokens": {"keep_rate": 0.5, "fuse": True}, "attention": {"keep_rate": 0.2}}
    model = create_vit("deit_tiny_patch16_224", sparsity, drop_path_rate=0.1).train()
    model(torch.randn(2, 3, 224, 224)).logsumexp(-1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_set_keep_rates_switches_levels_at_run_time():
    model = create_vit("deit_tiny_patch16_224", {"tokens": {"keep_rate": 0.5}, "attention": {"keep_rate": 0.2}})
    images = torch.randn(1, 3, 224, 224)
    model(images)
    assert model.blocks.tokens_per_block[-1] == 1 + 25
    set_keep_rates(model, tokens=1.0, attention=1.0)
    model(images)
    assert model.blocks.tokens_per_block == [197] * 12
    with pytest.raises(ValueError, match="keep rates must lie in"):
        set_keep_rates(model, tokens=0.0, attention=1.0)


def test_locations_beyond_the_depth_are_rejected():
    with pytest.raises(ValueError, match=r"blocks \[12\] do not exist \(the model has 12 blocks"):
        create_vit("deit_tiny_patch16_224", {"tokens": {"keep_rate": 0.7, "locations": [3, 12]}})
