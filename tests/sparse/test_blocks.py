"""The block's attention paths: fused kernels, the [CLS]-row ranking, fp32 rankings, the flex kernel,
activation checkpointing through the routing, and timm's paths that would bypass it."""
import pytest
import timm
import torch

from trivit.sparse import create_vit, set_keep_rates
from trivit.sparse.attention import build_attention_mask
from trivit.sparse.blocks import Links, build_links
from trivit.sparse.tokens import select_tokens

SPARSE = {"tokens": {"keep_rate": 0.7, "locations": [1, 3]}, "attention": {"keep_rate": 0.3}}


def small_vit(sparsity=None, **kwargs):
    args = dict(img_size=64, depth=5, num_classes=4, drop_path_rate=0.0)
    args.update(kwargs)
    return create_vit("deit_tiny_patch16_224", sparsity, **args)


def random_links(batch: int, length: int, generator: torch.Generator) -> Links:
    mask = torch.rand(batch, 1, length, length, generator=generator) > 0.6
    mask[..., :, 0] = True
    mask[..., 0, :] = True
    return Links(mask)


def test_block_forward_equals_timm_block():
    torch.manual_seed(0)
    theirs = timm.create_model("deit_tiny_patch16_224").eval()
    ours = create_vit("deit_tiny_patch16_224").eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 197, 192)
    torch.testing.assert_close(ours.blocks[3](x), theirs.blocks[3](x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_cls_row_ranking_equals_the_explicit_attention_outputs_and_gradients(masked):
    """A pruning block's fused attention + one [CLS] softmax row is the explicit B x H x N x N path, values and grads."""
    generator = torch.Generator().manual_seed(1)
    model = small_vit().train()
    block = model.blocks[1]
    x = torch.randn(2, 17, 192, generator=generator)
    links = random_links(2, 17, generator) if masked else None

    def route(tokens, attention):  # fuse: the gradient also flows through the ranking attention
        kept, _ = select_tokens(tokens, attention[:, 0, 1:], 0.5, 1, fuse=True, selector="attentive")
        return kept, None, None

    results = {}
    for ranking in ("cls", "full"):
        block.zero_grad()
        inputs = x.clone().requires_grad_()
        out, *_ = block.forward_routed(inputs, links, route, ranking)
        out.square().sum().backward()
        results[ranking] = (out, inputs.grad, {n: p.grad.clone() for n, p in block.named_parameters()})
    (out_cls, dx_cls, grads_cls), (out_full, dx_full, grads_full) = results["cls"], results["full"]
    assert out_cls.shape == (2, 1 + 8 + 1, 192)
    torch.testing.assert_close(out_cls, out_full, rtol=0, atol=1e-6)
    torch.testing.assert_close(dx_cls, dx_full, rtol=0, atol=1e-6 * dx_full.abs().max().item())
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_cls[name], grad, rtol=0, atol=1e-6 * max(grad.abs().max().item(), 1.0),
                                   msg=name)


def test_rankings_are_fp32_under_bf16_autocast():
    """bf16 rounding must not reorder tokens: the [CLS] row is the fp32 softmax of the block's q and k."""
    generator = torch.Generator().manual_seed(2)
    block = small_vit().eval().blocks[1]
    x = torch.randn(2, 17, 192, generator=generator)
    seen = {}

    def route(tokens, attention):
        seen["attention"] = attention
        return tokens, None, None

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        block.forward_routed(x, None, route, "cls")
        qkv = block.attn.qkv(block.norm1(x))
    assert qkv.dtype == torch.bfloat16 and seen["attention"].dtype == torch.float32
    q, k, _ = qkv.double().reshape(2, 17, 3, 3, 64).permute(2, 0, 3, 1, 4)
    expected = ((q[:, :, :1] @ k.transpose(-2, -1)) * 64 ** -0.5).softmax(-1).mean(1)
    torch.testing.assert_close(seen["attention"].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_kernel_equals_sdpa_in_eval():
    """flex_attention runs forward on the CPU (no backward): the same logits as SDPA with the boolean mask."""
    torch.manual_seed(0)
    sdpa = small_vit(SPARSE).eval()
    flex = small_vit({**SPARSE, "attention": {"keep_rate": 0.3, "kernel": "flex"}}).eval()
    flex.load_state_dict(sdpa.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(flex(images), sdpa(images), rtol=0, atol=1e-5)
    assert flex.blocks.attention_density.keys() == {1, 3}


def test_flex_block_mask_holds_the_kept_links():
    generator = torch.Generator().manual_seed(3)
    links = random_links(2, 150, generator)
    links.mask[1, :, 128:, 128:] = False  # one 128 x 128 tile with no kept link
    block_mask = build_links(links.mask, "flex").block_mask
    padded = torch.nn.functional.pad(links.mask, (0, 106, 0, 106))
    tiles = padded.unflatten(2, (2, 128)).unflatten(4, (2, 128)).any(dim=(3, 5))  # (B, 1, 2, 2)
    assert tiles[1, 0, 1, 1].item() is False
    assert torch.equal(block_mask.to_dense().bool(), tiles)
    assert build_links(links.mask, "sdpa").block_mask is None


def train_step_grads(model, images, labels, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, images):
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images).sum().backward()
    return total


def test_set_grad_checkpointing_keeps_the_routing_and_the_numbers():
    """timm's API turns on trivit's checkpointing: same loss and grads bit for bit (drop-path RNG restored),
    tokens still pruned, fewer bytes saved for backward."""
    sparsity = {**SPARSE, "tokens": {"keep_rate": 0.7, "locations": [1, 3], "selector": "random", "fuse": True}}
    model = small_vit(sparsity, drop_path_rate=0.2).train()
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    plain_loss, plain_grads = train_step_grads(model, images, labels, seed=5)
    plain_tokens = list(model.blocks.tokens_per_block)
    plain_bytes = saved_bytes(model, images)

    model.set_grad_checkpointing()
    assert model.blocks.grad_checkpointing and not getattr(model, "grad_checkpointing", False)
    loss, grads = train_step_grads(model, images, labels, seed=5)
    assert model.blocks.tokens_per_block == plain_tokens == [17, 14, 14, 12, 12]
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name
    assert saved_bytes(model, images) < plain_bytes / 2


def test_forward_intermediates_refuses_to_skip_the_routing():
    model = small_vit(SPARSE).eval()
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(RuntimeError, match="set_keep_rates"):
        model.forward_intermediates(images)
    set_keep_rates(model, 1.0, 1.0)
    reference = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=5, num_classes=4).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(images, indices=2)
        expected_final, expected = reference.forward_intermediates(images, indices=2)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=1e-6)
    torch.testing.assert_close(intermediates[-1], expected[-1], rtol=0, atol=1e-6)


def test_forward_features_refuses_an_outside_mask():
    model = small_vit(SPARSE).eval()
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 3, 64, 64), attn_mask=torch.ones(1, 1, 17, 17, dtype=torch.bool))


def test_attention_level_mask_is_built_from_the_full_rows():
    """Where the attention level ranks links, the block returns every softmax row (each sums to 1)."""
    model = small_vit(SPARSE).eval()
    seen = {}
    original = model.blocks.route

    def spy(x, attention):
        seen[len(seen)] = attention
        return original(x, attention)

    model.blocks.route = spy
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert seen[0].shape == (2, 17, 17) and seen[1].shape == (2, 13, 13)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(2, 17))
    kept = torch.arange(16).expand(2, 16)
    assert build_attention_mask(seen[0], kept, 0.3, 1, 0).shape == (2, 1, 17, 17)
