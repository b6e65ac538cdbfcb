"""Semantic tokens (STViT): the whole forward pass against a float64 reference written from the paper's
equations, FLOPs against torch's counter, gradients, timm checkpoints, and the refused compositions."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trivit.config import ConfigError
from trivit.engine.model.pretrained import init_from
from trivit.sparse import TapRequest, create_vit, set_keep_rates
from trivit.sparse.flops import dense_fraction, model_flops

SMALL = dict(num_classes=5, img_size=56, patch_size=4, in_chans=1, embed_dim=32, depth=6, num_heads=2, mlp_ratio=2.0)
"""A 14 x 14 grid (196 patches), 6 blocks: the STGM at blocks 2 and 3 (depth // 3)."""


def semantic_vit(**semantic):
    torch.manual_seed(0)
    return create_vit("deit_tiny_patch16_224", {"semantic": {"num_tokens": 16, **semantic}}, **SMALL)


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def reference_block(block, queries, context):
    """A pre-norm transformer block whose attention takes queries from ``queries`` and keys and values from
    ``context``: x = q + W_o softmax(Q K^T / sqrt(d_h)) V, then x + MLP(LN(x)), from the equations."""
    attn, heads = block.attn, block.attn.num_heads
    dim = queries.shape[-1]
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = layer_norm(queries, block.norm1) @ weight[:dim].T + bias[:dim]
    k = layer_norm(context, block.norm1) @ weight[dim:2 * dim].T + bias[dim:2 * dim]
    v = layer_norm(context, block.norm1) @ weight[2 * dim:].T + bias[2 * dim:]

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, dim // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads)
    mixed = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(queries.shape)
    x = queries + mixed @ attn.proj.weight.T + attn.proj.bias
    hidden = layer_norm(x, block.norm2) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def reference_pool(patches, grid, side, kind):
    """Adaptive pooling of the (B, grid x grid, C) tokens to side x side cells: cell i spans rows
    floor(i grid / side) .. ceil((i + 1) grid / side) - 1, likewise the columns."""
    image = patches.reshape(patches.shape[0], grid, grid, -1)
    cells = []
    for i in range(side):
        for j in range(side):
            rows = slice(i * grid // side, -(-(i + 1) * grid // side))
            cols = slice(j * grid // side, -(-(j + 1) * grid // side))
            cell = image[:, rows, cols].flatten(1, 2)
            cells.append(cell.amax(1) if kind == "max" else cell.mean(1))
    return torch.stack(cells, dim=1)


def reference_forward(model, images, head, pool, recover_at=None):
    blocks = list(model.blocks)
    x = model._pos_embed(model.patch_embed(images))
    first = len(blocks) // 3
    for block in blocks[:first]:
        x = reference_block(block, x, x)
    cls, patches = x[:, :1], x[:, 1:]
    carried = cls if head == "cls" else x[:, :0]
    semantic = reference_block(blocks[first], torch.cat([carried, reference_pool(patches, 14, 4, pool)], 1),
                               torch.cat([carried, patches], 1))
    queries = torch.cat([semantic[:, :carried.shape[1]], semantic[:, carried.shape[1]:] + model.global_centres], 1)
    x = reference_block(blocks[first + 1], queries, torch.cat([queries, patches], 1))
    for index in range(first + 2, len(blocks)):
        if index == recover_at:
            x = reference_block(blocks[index], torch.cat([x[:, :carried.shape[1]], patches], 1), x)
        else:
            x = reference_block(blocks[index], x, x)
    x = layer_norm(x, model.norm)
    features = x[:, 0] if head == "cls" else x.mean(1)
    return features @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize("head, pool, recover_at", [("gap", "max", None), ("gap", "avg", 4), ("cls", "max", 5)])
def test_the_semantic_forward_matches_the_papers_equations_in_float64(head, pool, recover_at):
    model = semantic_vit(head=head, pool=pool, recover_at=recover_at).double().eval()
    images = torch.randn(2, 1, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        got = model(images)
        expected = reference_forward(model, images, head, pool, recover_at)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    carried = 1 if head == "cls" else 0
    tokens = [197, 197, carried + 16, carried + 16, carried + 16, carried + 16]
    if recover_at is not None:
        tokens[recover_at:] = [carried + 196] * (6 - recover_at)
    assert model.blocks.tokens_per_block == tokens


@pytest.mark.parametrize("semantic", [{}, {"head": "cls", "recover_at": 4}, {"num_tokens": 9, "global_centres": False}])
def test_analytic_flops_equal_torchs_count(semantic):
    model = semantic_vit(**semantic)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 1, 56, 56))
    assert model_flops(model) == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)


def test_deit_small_with_16_semantic_tokens_has_the_papers_flops():
    """The paper: -58% FLOPs for DeiT-S with 16 semantic tokens at blocks 4-5."""
    with torch.device("meta"):
        model = create_vit("deit_small_patch16_224", {"semantic": {"num_tokens": 16}})
    assert dense_fraction(model) == pytest.approx(0.42, abs=0.015)


def test_gradients_reach_every_parameter_the_global_centres_included():
    model = semantic_vit(recover_at=5)
    model(torch.randn(2, 1, 56, 56)).square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert "global_centres" in dict(model.named_parameters())


def test_the_state_dict_is_timms_plus_the_global_centres(tmp_path):
    model = semantic_vit()
    reference = timm.create_model("deit_tiny_patch16_224", **SMALL)
    state = model.state_dict()
    assert set(state) - set(reference.state_dict()) == {"global_centres"}
    reference.load_state_dict({k: v for k, v in state.items() if k != "global_centres"}, strict=True)
    save_file(reference.state_dict(), str(tmp_path / "dense.safetensors"))
    fresh = semantic_vit()
    centres = fresh.global_centres.detach().clone()
    record = init_from(fresh, str(tmp_path / "dense.safetensors"), "deit_tiny_patch16_224", {})
    assert record["init_changes"] == ["global_centres is not in the weights (trivit adds it): it keeps its "
                                      "initialisation"]
    assert torch.equal(fresh.global_centres, centres) and torch.equal(fresh.blocks[3].attn.qkv.weight,
                                                                      model.blocks[3].attn.qkv.weight)


def test_the_example_level_reads_the_mean_querys_attention_where_cls_is_gone():
    """With head 'gap' there is no [CLS] after the STGM: the last block's recorded row is the softmax of the
    mean query against the keys, averaged over the heads."""
    model = semantic_vit().double().eval()
    last = model.blocks[-1]
    inputs = []
    routed = last.forward_routed
    last.forward_routed = lambda x, *args: inputs.append(x) or routed(x, *args)
    with torch.no_grad():
        _, tapped = model(torch.randn(2, 1, 56, 56, dtype=torch.float64), taps=TapRequest(cls_attention=True))
        x = layer_norm(inputs[0], last.norm1)
        dim, heads = x.shape[-1], last.attn.num_heads
        q = (x @ last.attn.qkv.weight[:dim].T + last.attn.qkv.bias[:dim]).reshape(2, 16, heads, -1).transpose(1, 2)
        k = (x @ last.attn.qkv.weight[dim:2 * dim].T + last.attn.qkv.bias[dim:2 * dim]).reshape(2, 16, heads, -1)
        scores = q.mean(2, keepdim=True) @ k.permute(0, 2, 3, 1) / math.sqrt(dim // heads)
        expected = scores.softmax(-1).mean(1)[:, 0]
    torch.testing.assert_close(tapped.cls_attention, expected, rtol=0, atol=1e-12)


def test_activation_checkpointing_recomputes_the_semantic_stage_exactly():
    images = torch.randn(4, 1, 56, 56)
    grads = []
    for checkpointing in (False, True):
        model = semantic_vit(recover_at=5)
        model.set_grad_checkpointing(checkpointing)
        model(images).square().sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])


@pytest.mark.parametrize("sparsity, key", [
    ({"semantic": {"num_tokens": 12}}, "sparsity.semantic.num_tokens"),
    ({"semantic": {"num_tokens": 16, "after_block": 5}}, "sparsity.semantic.after_block"),
    ({"semantic": {"num_tokens": 16, "recover_at": 3}}, "sparsity.semantic.recover_at"),
    ({"semantic": {"num_tokens": 16}, "tokens": {"keep_rate": 0.7, "locations": [1, 2]}}, "sparsity.tokens.locations"),
    ({"semantic": {"num_tokens": 16}, "tokens": {"keep_rate": 0.7, "locations": [1], "fuse": True}},
     "sparsity.tokens.fuse"),
    ({"semantic": {"num_tokens": 16}, "attention": {"keep_rate": 0.2}, "tokens": {"locations": [1, 3]}},
     "sparsity.tokens.locations"),
])
def test_settings_that_do_not_fit_or_compose_are_refused(sparsity, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        create_vit("deit_tiny_patch16_224", sparsity, **SMALL)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_centres_pool_the_kept_patches_of_each_cell(pool):
    """After token pruning, a cell's initial centre pools its kept patches only (zero where none is kept);
    with every patch kept it is the plain grid pooling."""
    semantic = semantic_vit(pool=pool).blocks.semantic
    generator = torch.Generator().manual_seed(3)
    patches = torch.randn(2, 196, 8, dtype=torch.float64, generator=generator)
    everything = torch.arange(196).expand(2, 196)
    torch.testing.assert_close(semantic.initial_centres(patches, everything), semantic.initial_centres(patches, None))
    positions = torch.stack([torch.randperm(196, generator=generator)[:12].sort().values for _ in range(2)])
    kept = patches.gather(1, positions.unsqueeze(-1).expand(-1, -1, 8))  # 12 patches for 16 cells
    expected = torch.zeros(2, 16, 8, dtype=torch.float64)
    for b in range(2):
        for cell in range(16):
            i, j = divmod(cell, 4)
            rows, cols = range(i * 14 // 4, -(-(i + 1) * 14 // 4)), range(j * 14 // 4, -(-(j + 1) * 14 // 4))
            members = [k for k, place in enumerate(positions[b].tolist()) if place // 14 in rows and place % 14 in cols]
            if members:
                values = kept[b, members]
                expected[b, cell] = values.amax(0) if pool == "max" else values.mean(0)
    torch.testing.assert_close(semantic.initial_centres(kept, positions), expected, rtol=0, atol=1e-12)
    assert (expected.abs().sum(-1) == 0).any(), "some cell kept no patch"


def test_token_pruning_before_the_stgm_composes():
    torch.manual_seed(0)
    model = create_vit("deit_tiny_patch16_224", {"semantic": {"num_tokens": 16}, "tokens": {"keep_rate": 0.5,
                                                                                           "locations": [0, 1]}}, **SMALL)
    images = torch.randn(2, 1, 56, 56)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    assert model.blocks.tokens_per_block == [1 + 98, 1 + 49, 16, 16, 16, 16]
    assert model_flops(model) == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    model(images).sum().backward()
    assert model.global_centres.grad.abs().sum() > 0


def test_keep_rates_set_later_prune_only_before_the_stgm():
    """A semantic model built dense (default locations 1, 3, 4 of 6) and set to prune later, as trivit eval
    does: only block 1, before the STGM at 2-3, prunes."""
    model = semantic_vit()
    set_keep_rates(model, 0.5, 1.0)
    model(torch.randn(2, 1, 56, 56))
    assert model.blocks.locations == {1} and model.blocks.tokens_per_block == [197, 99, 16, 16, 16, 16]


def test_the_attention_level_before_the_stgm_composes():
    torch.manual_seed(0)
    model = create_vit("deit_tiny_patch16_224", {"semantic": {"num_tokens": 16}, "attention": {"keep_rate": 0.2},
                                                 "tokens": {"locations": [0, 1]}}, **SMALL)
    model(torch.randn(2, 1, 56, 56))
    assert set(model.blocks.attention_density) == {0, 1} and model.blocks.tokens_per_block[2:] == [16] * 4


def test_a_distilled_deit_is_refused():
    with pytest.raises(ConfigError, match="distillation"):
        create_vit("deit_tiny_distilled_patch16_224", {"semantic": {"num_tokens": 16}}, **SMALL)
