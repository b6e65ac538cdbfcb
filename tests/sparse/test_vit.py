"""create_vit against timm itself: same parameters, same logits."""
from __future__ import annotations

import pytest
import timm
import torch

from trivit.config import ConfigError
from trivit.sparse import TriLevelBlock, create_vit

NAMES = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
         "vit_base_patch16_224", "vit_large_patch16_224", "deit_tiny_distilled_patch16_224"]


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kwargs", [{}, {"img_size": 32, "patch_size": 4, "num_classes": 10, "in_chans": 1}])
def test_state_dict_keys_and_shapes_match_timm(name, kwargs):
    with torch.device("meta"):
        ours, reference = create_vit(name, **kwargs), timm.create_model(name, **kwargs)
    assert shapes(ours) == shapes(reference)
    assert all(isinstance(block, TriLevelBlock) for block in ours.blocks)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224"])
@pytest.mark.parametrize("training", [False, True])
def test_logits_equal_timm_on_the_same_weights(name, training):
    torch.manual_seed(0)
    reference = timm.create_model(name, drop_path_rate=0.1, num_classes=7)
    ours = create_vit(name, drop_path_rate=0.1, num_classes=7)
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.train(training)
    ours.train(training)
    images = torch.randn(2, 3, 224, 224)
    torch.manual_seed(1)
    expected = reference(images)
    torch.manual_seed(1)
    got = ours(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if training:
        torch.manual_seed(2)
        other_draw = ours(images)
        assert not torch.allclose(other_draw, got), "drop-path must be active in train mode"


def test_a_distilled_deit_gives_timms_two_heads_and_keeps_its_distillation_token():
    """deit_*_distilled: in distilled training both heads' logits as timm gives them, their mean in eval;
    with tokens pruned the distillation token stays (2 prefix tokens + the kept patches)."""
    torch.manual_seed(0)
    kwargs = dict(num_classes=5, img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2)
    reference = timm.create_model("deit_tiny_distilled_patch16_224", **kwargs)
    ours = create_vit("deit_tiny_distilled_patch16_224", **kwargs)
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    for model in (reference, ours):
        model.set_distilled_training(True)
    for got, expected in zip(ours(images), reference(images)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(images), reference(images), rtol=0, atol=1e-5)
    pruned = create_vit("deit_tiny_distilled_patch16_224", {"tokens": {"keep_rate": 0.5, "locations": [1]}}, **kwargs)
    pruned.load_state_dict(reference.state_dict())
    pruned.eval()(images)
    assert pruned.blocks.tokens_per_block == [2 + 16, 2 + 8, 2 + 8, 2 + 8]


@pytest.mark.parametrize("direction", ["ours_to_timm", "timm_to_ours"])
def test_checkpoint_loads_strictly_both_ways(direction):
    kwargs = {"img_size": 32, "patch_size": 8, "num_classes": 5}
    torch.manual_seed(0)
    ours = create_vit("deit_tiny_patch16_224", **kwargs).eval()
    torch.manual_seed(1)
    reference = timm.create_model("deit_tiny_patch16_224", **kwargs).eval()
    source, target = (ours, reference) if direction == "ours_to_timm" else (reference, ours)
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(target(images), source(images)), "two different initialisations"
    target.load_state_dict(source.state_dict(), strict=True)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
    torch.testing.assert_close(target(images), source(images), rtol=0, atol=1e-6)


def test_sparsity_accepts_a_dict_and_rejects_unknown_keys():
    model = create_vit("deit_tiny_patch16_224", {"tokens": {"keep_rate": 0.5, "locations": [1]}}, img_size=32,
                       patch_size=8)
    assert model.blocks.token_keep_rate == 0.5 and model.blocks.attention_keep_rate == 1.0
    assert model.blocks.locations == {1}
    model(torch.randn(1, 3, 32, 32))
    assert model.blocks.tokens_per_block == [1 + 16, 1 + 8] + [1 + 8] * 10
    with pytest.raises(ConfigError, match=r"sparsity\.token"):
        create_vit("deit_tiny_patch16_224", {"token": {"keep_rate": 0.7}}, img_size=32, patch_size=8)


def test_model_names_with_a_pretrained_tag_are_accepted():
    with torch.device("meta"):
        model = create_vit("vit_base_patch16_224.augreg2_in21k_ft_in1k", num_classes=10)
    assert model.pretrained_cfg["tag"] == "augreg2_in21k_ft_in1k" and len(model.blocks) == 12


@pytest.mark.parametrize("name, message", [
    ("resnet50", "not a plain ViT"),
    ("vit_small_patch16_18x2_224", "not a plain ViT"),
    ("deit_tiny_patch16", "unknown timm model"),
    ("vit_base_patch16_224.no_such_tag", "timm has no pretrained tag 'no_such_tag' for 'vit_base_patch16_224'; its "
                                         "tags: vit_base_patch16_224.augreg2_in21k_ft_in1k"),
])
def test_rejects_models_that_are_not_plain_vits(name, message):
    with pytest.raises(ValueError, match=message):
        create_vit(name)
