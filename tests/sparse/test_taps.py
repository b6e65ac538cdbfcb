"""What a forward pass hands back when asked (sparse/taps.py): the last block's [CLS] attention and a middle
block's [CLS] output, from both block loops, against float64 references written from the equations."""
from __future__ import annotations

import pytest
import torch

from tests.sparse.test_dcal import SMALL, dcal_vit, images, reference_attention, reference_streams
from trivit.sparse import Tapped, TapRequest, create_vit


def plain_vit(sparsity=None):
    torch.manual_seed(0)
    return create_vit("deit_tiny_patch16_224", sparsity, **SMALL).double().eval()


def test_a_request_hands_back_the_references_beside_the_same_logits():
    model = plain_vit()
    x = model.embed(images())
    inputs, attentions, _ = reference_streams(model, x)
    with torch.no_grad():
        plain = model(images())
        logits, tapped = model(images(), taps=TapRequest(cls_attention=True, cls_at=1))
    assert isinstance(plain, torch.Tensor) and isinstance(tapped, Tapped)
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-12)
    prefix = model.num_prefix_tokens
    torch.testing.assert_close(tapped.cls_attention, attentions[-1][:, 0, prefix:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tapped.cls_output, inputs[2][:, 0], rtol=1e-10, atol=1e-12)  # block 1's output


def test_nothing_asked_nothing_handed_back_and_nothing_kept_on_the_model():
    model = plain_vit()
    with torch.no_grad():
        _, tapped = model(images(), taps=TapRequest())
    assert tapped == Tapped(None, None)
    state = {name: value for name, value in vars(model.blocks).items() if isinstance(value, torch.Tensor)}
    assert state == {}, f"tensors kept on the blocks between calls: {sorted(state)}"


def test_the_dcal_loop_hands_back_what_the_routed_loop_does():
    """The same weights, with and without DCAL's branches (eval, GLCA off: DCAL's loop, the plain stream)."""
    dcal = dcal_vit(glca_top_r=0.1, pwca=True).train()
    plain = plain_vit()
    plain.load_state_dict({k: v for k, v in dcal.state_dict().items() if not k.startswith("dcal.")})
    request = TapRequest(cls_attention=True, cls_at=0)
    with torch.no_grad():
        _, theirs = plain(images(), taps=request)
        outputs, ours = dcal(images(), distractors=torch.arange(4).roll(1), taps=request)
    assert outputs.pwca is not None  # the paired stream ran; the taps are the self-attention stream's
    torch.testing.assert_close(ours.cls_attention, theirs.cls_attention, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.cls_output, theirs.cls_output, rtol=1e-10, atol=1e-12)


def test_a_pruned_last_block_hands_back_its_kept_tokens_cls_row():
    """Tokens pruned before the last block: the row is over the kept patches (and the fused one), as the
    example level scores it."""
    model = plain_vit({"tokens": {"keep_rate": 0.5, "locations": [1], "fuse": True}})
    with torch.no_grad():
        _, tapped = model(images(), taps=TapRequest(cls_attention=True))
    kept = model.blocks.tokens_per_block[1] - model.num_prefix_tokens
    assert tapped.cls_attention.shape == (4, kept)
    captured = []
    last = model.blocks[-1]
    hook = last.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        model.blocks(model.embed(images()))
    hook.remove()
    expected = reference_attention(last, captured[0])[:, 0, model.num_prefix_tokens:]
    torch.testing.assert_close(tapped.cls_attention, expected, rtol=1e-10, atol=1e-12)


def test_two_methods_cannot_tap_two_blocks():
    assert TapRequest(True).merged(TapRequest(cls_at=3)) == TapRequest(True, 3)
    with pytest.raises(ValueError, match="blocks 2 and 3"):
        TapRequest(cls_at=2).merged(TapRequest(cls_at=3))
