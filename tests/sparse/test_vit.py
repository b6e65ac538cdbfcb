"""create_vit against timm itself: same parameters, same logits."""
from __future__ import annotations

import pytest
import timm
import torch

from trivit.config import ConfigError
from trivit.sparse import TriLevelBlock, create_vit

NAMES = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
         "vit_base_patch16_224", "vit_large_patch16_224"]


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


def test_checkpoint_loads_strictly_both_ways():
    kwargs = {"img_size": 32, "patch_size": 8, "num_classes": 5}
    ours = create_vit("deit_tiny_patch16_224", **kwargs)
    reference = timm.create_model("deit_tiny_patch16_224", **kwargs)
    reference.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(reference.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key


def test_sparsity_accepts_a_dict_and_rejects_unknown_keys():
    assert create_vit("deit_tiny_patch16_224", {}, img_size=32, patch_size=8) is not None
    with pytest.raises(ConfigError, match=r"sparsity\.token"):
        create_vit("deit_tiny_patch16_224", {"token": {"keep_rate": 0.7}}, img_size=32, patch_size=8)


@pytest.mark.parametrize("name, message", [
    ("resnet50", "not a plain ViT"),
    ("vit_small_patch16_18x2_224", "not a plain ViT"),
    ("deit_tiny_patch16", "unknown timm model"),
])
def test_rejects_models_that_are_not_plain_vits(name, message):
    with pytest.raises(ValueError, match=message):
        create_vit(name)
