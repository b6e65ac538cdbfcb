"""Token level against a plain float64 reference that loops over samples (method.md section 2)."""
from __future__ import annotations

import math

import pytest
import torch

from trivit.sparse import create_vit
from trivit.sparse.flops import token_counts
from trivit.sparse.tokens import kept_count, select_tokens


def reference_select(x, cls_attention, keep_rate, prefix, fuse):
    """Per sample: rank patches by [CLS] attention, keep the top ceil(N r) in their order, fuse the rest."""
    outputs, kept_all = [], []
    for b in range(x.shape[0]):
        n = cls_attention.shape[1]
        keep = math.ceil(n * keep_rate)
        ranked = sorted(range(n), key=lambda j: -float(cls_attention[b, j]))
        kept = sorted(ranked[:keep])
        rows = [x[b, i] for i in range(prefix)] + [x[b, prefix + j] for j in kept]
        if fuse and keep < n:
            fused = torch.zeros_like(x[b, 0])
            for j in range(n):
                if j not in kept:
                    fused = fused + cls_attention[b, j] * x[b, prefix + j]
            rows.append(fused)
        outputs.append(torch.stack(rows))
        kept_all.append(kept)
    return torch.stack(outputs), torch.tensor(kept_all)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("keep_rate, prefix", [(0.7, 1), (0.5, 1), (0.3, 2), (1.0, 1)])
def test_selection_matches_the_reference(fuse, keep_rate, prefix):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, prefix + 20, 8, dtype=torch.float64, generator=generator)
    cls_attention = torch.rand(3, 20, dtype=torch.float64, generator=generator).softmax(-1)
    got, kept = select_tokens(x, cls_attention, keep_rate, prefix, fuse=fuse, selector="attentive")
    expected, expected_kept = reference_select(x, cls_attention, keep_rate, prefix, fuse)
    assert torch.equal(kept, expected_kept)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_random_selector_draws_a_different_subset_per_sample():
    torch.manual_seed(0)
    x = torch.arange(2 * 41, dtype=torch.float32).reshape(1, 41, 2).expand(64, -1, -1)
    cls_attention = torch.linspace(0, 1, 40).expand(64, -1)
    out, kept = select_tokens(x, cls_attention, 0.5, 1, fuse=False, selector="random")
    assert out.shape == (64, 21, 2) and torch.equal(out[:, 0], x[:, 0])
    assert len({tuple(k.tolist()) for k in kept}) == 64
    frequency = torch.zeros(40).index_add_(0, kept.flatten(), torch.ones(kept.numel())) / 64
    assert 0.2 < frequency.min() and frequency.max() < 0.8, "every patch has an even chance, whatever its attention"


def test_kept_count_is_the_ceiling():
    assert [kept_count(196, 0.7), kept_count(138, 0.7), kept_count(97, 0.7)] == [138, 97, 68]
    assert kept_count(10, 0.3) == 3 and kept_count(3, 0.01) == 1


@pytest.mark.parametrize("fuse, expected", [(False, [138, 97, 68]), (True, [139, 99, 71])])
def test_tokens_per_block_compound(fuse, expected):
    model = create_vit("deit_tiny_patch16_224", {"tokens": {"keep_rate": 0.7, "fuse": fuse}})
    model(torch.randn(2, 3, 224, 224))
    patches = [n - 1 for n in model.blocks.tokens_per_block]
    assert patches == [196] * 3 + [expected[0]] * 3 + [expected[1]] * 3 + [expected[2]] * 3
    counts = token_counts(196, 1, 12, {3, 6, 9}, 0.7, fuse)
    assert [m - 1 for _, m, _ in counts] == patches
    assert [rows for _, _, rows in counts] == [1 if block in (3, 6, 9) else 0 for block in range(12)]
