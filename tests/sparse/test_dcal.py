"""DCAL (dual cross-attention learning): the rollout, GLCA and PWCA against float64 references written
from the paper's equations, the inference rule, gradients, the distractor draws and the refused settings."""
from __future__ import annotations

import pytest
import torch

from tests.sparse.test_semantic import layer_norm, reference_block
from trivit.config import ConfigError
from trivit.sparse import create_vit, set_keep_rates
from trivit.sparse.dcal import (
    DCALConfig,
    DCALOutputs,
    add_dcal,
    cyclic_distractors,
    keyed_distractors,
    rollout_cls_row,
    run_blocks,
    summed_probabilities,
)

SMALL = dict(num_classes=5, img_size=24, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0,
             drop_path_rate=0.0)
"""36 patches, 3 blocks."""


def dcal_vit(glca_top_r=0.1, pwca=True, sparsity=None, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    model = create_vit("deit_tiny_patch16_224", sparsity, **dict(SMALL, **kwargs))
    add_dcal(model, DCALConfig(glca_top_r=glca_top_r, pwca=pwca))
    with torch.no_grad():  # the GLCA branch unlike the last block, so that a mix-up of the two shows
        for param in model.dcal.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.to(dtype)


def images(batch=4, dtype=torch.float64):
    return torch.randn(batch, 1, 24, 24, generator=torch.Generator().manual_seed(1), dtype=dtype)


def reference_attention(block, x):
    """Head-averaged softmax(Q K^T / sqrt(d_h)) of a block on its input ``x``, from the equations."""
    attn, dim = block.attn, x.shape[-1]
    heads = attn.num_heads
    y = layer_norm(x, block.norm1)
    q = y @ attn.qkv.weight[:dim].T + attn.qkv.bias[:dim]
    k = y @ attn.qkv.weight[dim:2 * dim].T + attn.qkv.bias[dim:2 * dim]

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, dim // heads).transpose(1, 2)

    return (split(q) @ split(k).transpose(-1, -2) * (dim // heads) ** -0.5).softmax(-1).mean(1)


def reference_streams(model, x):
    """Each block's input and head-averaged attention, the final tokens, from the equations."""
    inputs, attentions = [], []
    for block in model.blocks:
        inputs.append(x)
        attentions.append(reference_attention(block, x))
        x = reference_block(block, x, x)
    return inputs, attentions, x


def reference_rollout(attentions):
    """R = Sbar_L ... Sbar_1 with Sbar = 0.5 S + 0.5 I, as whole matrices, in float64."""
    eye = torch.eye(attentions[0].shape[-1], dtype=torch.float64)
    rollout = eye
    for attention in attentions:
        rollout = (0.5 * attention.double() + 0.5 * eye) @ rollout
    return rollout


def test_rollout_cls_row_equals_the_matrix_product():
    generator = torch.Generator().manual_seed(0)
    attentions = [torch.rand(3, 7, 7, generator=generator).softmax(-1) for _ in range(4)]
    row = rollout_cls_row(attentions)
    torch.testing.assert_close(row.double(), reference_rollout(attentions)[:, 0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(row.sum(-1), torch.ones(3))  # a product of row-stochastic matrices


def test_each_block_runs_and_records_its_attention_as_the_equations_give():
    model = dcal_vit().eval()
    x = model.embed(images())
    _, expected, final = reference_streams(model, x)
    tokens, paired, attentions = run_blocks(model.blocks, x, None, None)
    assert paired is None
    for recorded, reference in zip(attentions, expected, strict=True):
        torch.testing.assert_close(recorded, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tokens, final, rtol=1e-10, atol=1e-12)
    outputs = model.train()(images(), distractors=torch.arange(4))
    torch.testing.assert_close(outputs.logits, model.head(layer_norm(final, model.norm)[:, 0]), rtol=1e-10,
                               atol=1e-12)


def reference_glca(model, x, top_r):
    """GLCA from the equations: the rollout ranks the patches; the top ceil(N top_r) attend to every token of
    the last block's output in the GLCA block; the mean of their outputs, normed, through the GLCA head."""
    _, attentions, final = reference_streams(model, x)
    scores = reference_rollout(attentions)[:, 0, 1:]
    count = -(-scores.shape[1] * top_r // 1)
    index = scores.argsort(dim=-1, descending=True)[:, :int(count)]
    queries = torch.stack([final[b, 1:][index[b]] for b in range(final.shape[0])])
    glca = model.dcal.glca
    local = reference_block(glca.block, queries, final)
    return layer_norm(local, glca.norm).mean(1) @ glca.head.weight.T + glca.head.bias


@pytest.mark.parametrize("top_r", [1.0, 0.1])
def test_glca_is_the_cross_attention_of_the_top_patches_to_every_token(top_r):
    """With every query kept, GLCA is a cross-attention of all patches to all tokens; at 0.1, of the 4 the
    rollout ranks highest."""
    model = dcal_vit(glca_top_r=top_r, pwca=False).train()
    outputs = model(images())
    expected = reference_glca(model, model.embed(images()), top_r)
    torch.testing.assert_close(outputs.glca, expected, rtol=1e-10, atol=1e-12)


def test_the_glca_output_depends_on_which_patches_the_rollout_picks():
    model = dcal_vit(glca_top_r=0.1, pwca=False).train()
    picked = model(images()).glca
    x = model.embed(images())
    _, _, final = reference_streams(model, x)
    glca = model.dcal.glca
    others = final[:, 1:5]  # the first four patches in place of the rollout's top four
    elsewhere = layer_norm(reference_block(glca.block, others, final), glca.norm).mean(1) @ glca.head.weight.T
    assert (picked - glca.head.bias - elsewhere).abs().max() > 1e-3


def test_pwca_with_each_image_its_own_distractor_is_self_attention():
    """Duplicated keys and values with equal scores: every weight halves, each value counts twice."""
    model = dcal_vit(glca_top_r=0.0, pwca=True).train()
    outputs = model(images(), distractors=torch.arange(4))
    torch.testing.assert_close(outputs.pwca, outputs.logits, rtol=1e-10, atol=1e-12)


def test_pwca_attends_to_own_and_distractor_tokens_under_one_softmax():
    model = dcal_vit(glca_top_r=0.0, pwca=True).train()
    distractors = torch.tensor([2, 0, 3, 1])
    outputs = model(images(), distractors=distractors)
    x = model.embed(images())
    inputs, _, _ = reference_streams(model, x)
    paired = x
    for block, own in zip(model.blocks, inputs):
        paired = reference_block(block, paired, torch.cat([paired, own[distractors]], dim=1))
    expected = model.head(layer_norm(paired, model.norm)[:, 0])
    torch.testing.assert_close(outputs.pwca, expected, rtol=1e-10, atol=1e-12)
    assert (outputs.pwca - outputs.logits).abs().max() > 1e-4


def test_inference_sums_the_two_heads_probabilities_and_drops_pwca():
    model = dcal_vit()
    train = model.train()(images(), distractors=torch.arange(4))
    evaluated = model.eval()(images())
    expected = (train.logits.softmax(-1) + train.glca.softmax(-1)) / 2
    torch.testing.assert_close(evaluated.exp(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(summed_probabilities(train.logits, train.glca).exp().sum(-1),
                               torch.ones(4, dtype=torch.float64))
    without_glca = dcal_vit(glca_top_r=0.0).eval()
    assert isinstance(without_glca(images()), torch.Tensor)


def test_gradients_reach_every_parameter():
    model = dcal_vit(dtype=torch.float32).train()
    outputs = model(images(dtype=torch.float32), distractors=torch.tensor([1, 2, 3, 0]))
    assert isinstance(outputs, DCALOutputs)
    (outputs.logits.sum() + outputs.glca.sum() + outputs.pwca.sum() + outputs.log_vars.sum()).backward()
    missing = [name for name, param in model.named_parameters() if param.grad is None or not param.grad.any()]
    assert not missing, missing


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = dcal_vit(dtype=torch.float32).train()
        model.set_grad_checkpointing(checkpointing)
        outputs = model(images(dtype=torch.float32), distractors=torch.tensor([1, 2, 3, 0]))
        (outputs.logits.sum() + outputs.glca.sum() + outputs.pwca.sum() + outputs.log_vars.sum()).backward()
        grads.append({name: param.grad for name, param in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_distractors_are_derangements_keyed_by_the_samples():
    order = torch.tensor([3, 0, 2, 1])
    assert cyclic_distractors(order).tolist() == [2, 3, 1, 0]  # 3->0, 0->2, 2->1, 1->3
    ids = [17, 4, 99, 23, 5, 61]
    drawn = keyed_distractors(ids, step=7, seed=0)
    assert sorted(drawn.tolist()) == list(range(6)) and all(drawn[i] != i for i in range(6))
    same_images_reordered = keyed_distractors(ids[::-1], step=7, seed=0)
    pairs = {(ids[i], ids[j]) for i, j in enumerate(drawn.tolist())}
    assert pairs == {(ids[::-1][i], ids[::-1][j]) for i, j in enumerate(same_images_reordered.tolist())}
    assert not torch.equal(drawn, keyed_distractors(ids, step=8, seed=0))
    with pytest.raises(ValueError, match="another image"):
        keyed_distractors([3], step=0, seed=0)


def test_the_branches_stay_out_of_timms_state_dict_names():
    model = dcal_vit()
    added = [name for name in model.state_dict() if name.startswith("dcal.")]
    assert {name.split(".")[1] for name in added} == {"glca", "loss_weights"}
    assert model.dcal.loss_weights.log_vars.shape == (3,)


@pytest.mark.parametrize("sparsity, key", [({"tokens": {"keep_rate": 0.5}}, "sparsity.tokens.keep_rate"),
                                           ({"attention": {"keep_rate": 0.5}}, "sparsity.attention.keep_rate"),
                                           ({"semantic": {"num_tokens": 4}}, "sparsity.semantic.num_tokens")])
def test_dcal_refuses_what_changes_the_token_set(sparsity, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        dcal_vit(sparsity=sparsity)


def test_dcal_refuses_a_model_without_class_token_and_a_distilled_one():
    with pytest.raises(ConfigError, match="class token"):
        dcal_vit(class_token=False, global_pool="avg")
    torch.manual_seed(0)
    distilled = create_vit("deit_tiny_distilled_patch16_224", None, **SMALL)
    with pytest.raises(ConfigError, match="distill"):
        add_dcal(distilled, DCALConfig(glca_top_r=0.1))


def test_keep_rates_below_one_are_refused_at_forward():
    model = dcal_vit()
    set_keep_rates(model, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="keep rate"):
        model.eval()(images())


@pytest.mark.parametrize("values, key", [({"glca_top_r": 1.5}, "glca_top_r"), ({"glca_top_r": -0.1}, "glca_top_r")])
def test_config_values_are_checked(values, key):
    with pytest.raises(ConfigError, match=key):
        DCALConfig(**values)
