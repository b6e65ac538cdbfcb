"""The pruned architecture: the base model at full widths, masked units, and the stripped model's logits."""
from __future__ import annotations

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trivit.sparse.flops import model_flops
from trivit.sparse.pruned import BlockWidths, PrunedArch, create_pruned_vit, set_unit_masks, strip_state, unit_axes
from trivit.sparse.vit import create_vit, set_keep_rates

BASE = "deit_tiny_patch16_224"
KWARGS = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=4, num_classes=5,
              qkv_bias=True)
SPARSITY = {"tokens": {"keep_rate": 0.5, "locations": [1], "fuse": True}, "attention": {"keep_rate": 0.5}}


def full_arch() -> PrunedArch:
    with torch.device("meta"):
        return PrunedArch.of_vit(BASE, create_vit(BASE, **KWARGS))


def random_masks(arch: PrunedArch, seed: int, keep: float = 0.6) -> dict[str, torch.Tensor]:
    """Masks that prune some units of every group (and keep at least two)."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for group, size in arch.unit_counts().items():
        mask = (torch.rand(size, generator=generator) < keep).float()
        mask[torch.randperm(size, generator=generator)[:2]] = 1
        masks[group] = mask
    return masks


def test_at_the_base_widths_it_is_the_timm_model():
    torch.manual_seed(0)
    reference = timm.create_model(BASE, **KWARGS).eval()
    pruned = create_pruned_vit(full_arch(), **KWARGS).eval()
    pruned.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(pruned(images), reference(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sparsity", [None, SPARSITY], ids=["dense", "tokens+attention"])
def test_the_stripped_model_gives_the_masked_models_logits(sparsity):
    torch.manual_seed(0)
    arch = full_arch()
    masked = create_pruned_vit(arch, sparsity, **KWARGS).eval()
    masks = random_masks(arch, seed=1)
    set_unit_masks(masked, masks)
    small_arch = arch.kept(masks)
    assert small_arch.embed_dim < arch.embed_dim
    for kind in ("heads", "qk_dim", "v_dim", "mlp_dim"):  # every kind of unit pruned somewhere
        assert any(getattr(s, kind) < getattr(b, kind) for s, b in zip(small_arch.blocks, arch.blocks))
    stripped = create_pruned_vit(small_arch, sparsity, **KWARGS).eval()
    stripped.load_state_dict(strip_state(masked.state_dict(), unit_axes(masked, arch), masks), strict=True)
    images = torch.randn(6, 1, 16, 16)
    expected = masked(images)
    torch.testing.assert_close(stripped(images), expected, rtol=0, atol=1e-5)
    if sparsity is not None:
        assert stripped.blocks.tokens_per_block == masked.blocks.tokens_per_block == [17, 10, 10]  # [CLS], 8 kept, 1 fused


def test_masked_units_receive_no_gradient_and_do_not_change_the_output():
    torch.manual_seed(0)
    arch = full_arch()
    model = create_pruned_vit(arch, **KWARGS).eval()
    masks = random_masks(arch, seed=2)
    set_unit_masks(model, masks)
    images = torch.randn(3, 1, 16, 16)
    before = model(images)
    model(images).square().sum().backward()
    axes = unit_axes(model, arch)
    for name, param in model.named_parameters():
        for axis in axes.get(name, []):
            pruned = (axis.ids >= 0) & ~masks[axis.group].bool()[axis.ids.clamp(min=0)]
            gradient = param.grad.movedim(axis.dim, 0)[pruned]
            assert torch.count_nonzero(gradient) == 0, f"{name} along {axis.dim} ({axis.group})"
            with torch.no_grad():  # the masked units' weights are free: changing them changes nothing
                param.movedim(axis.dim, 0)[pruned] = torch.randn_like(param.movedim(axis.dim, 0)[pruned])
    torch.testing.assert_close(model(images), before, rtol=0, atol=1e-6)


def test_the_architecture_file_round_trips_and_bad_ones_are_named(tmp_path):
    arch = full_arch().with_counts({**full_arch().unit_counts(), "blocks.1.heads": 2, "embed": 24})
    arch.save(tmp_path / "arch.json")
    assert PrunedArch.load(tmp_path / "arch.json") == arch
    (tmp_path / "bad.json").write_text('{"base": "deit_tiny_patch16_224", "embed_dim": 8, "blocks": '
                                       '[{"heads": 0, "qk_dim": 4, "v_dim": 4, "mlp_dim": 8, "scale": 0.5}]}')
    with pytest.raises(ValueError, match="bad.json.*heads.*at least one unit"):
        PrunedArch.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="trivit prune"):
        PrunedArch.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="3 blocks but .* has 2"):
        create_pruned_vit(PrunedArch(base=BASE, embed_dim=8, blocks=arch.blocks), **dict(KWARGS, depth=2))


def test_keep_rates_and_the_block_widths_apply_to_the_pruned_model():
    arch = PrunedArch(base=BASE, embed_dim=20, blocks=[
        BlockWidths(heads=3, qk_dim=5, v_dim=7, mlp_dim=11, scale=0.25),
        BlockWidths(heads=1, qk_dim=2, v_dim=9, mlp_dim=4, scale=0.25),
        BlockWidths(heads=2, qk_dim=8, v_dim=8, mlp_dim=30, scale=0.25)])
    model = create_pruned_vit(arch, SPARSITY, **KWARGS)
    assert PrunedArch.of_vit(BASE, model) == arch
    assert model.blocks[1].attn.qkv.weight.shape == (1 * (2 * 2 + 9), 20)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 5)
    set_keep_rates(model, 1.0, 1.0)
    model(torch.randn(2, 1, 16, 16))
    assert model.blocks.tokens_per_block == [17, 17, 17]


@pytest.mark.parametrize("sparsity", [None, SPARSITY], ids=["dense", "tokens+attention"])
def test_analytic_flops_of_a_pruned_model_equal_torchs_count(sparsity):
    arch = full_arch()
    model = create_pruned_vit(arch.kept(random_masks(arch, seed=3)), sparsity, **KWARGS).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 1, 16, 16))
    assert model_flops(model) == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
