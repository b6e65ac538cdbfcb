"""NViT's saliency against a float64 loop over units and against the true loss change on a quadratic;
the latency-aware choice of groups on a hand-worked case."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.sparse.test_pruned import BASE, KWARGS, full_arch
from trivit.sparse.latency import LatencyTable
from trivit.sparse.nvit import (
    CODE_DIVISORS,
    SaliencyMeter,
    choose_groups,
    code_saliency_axes,
    group_sizes,
    normalised,
)
from trivit.sparse.pruned import BlockWidths, PrunedArch, UnitAxis, create_pruned_vit, unit_axes
from trivit.sparse.vit import create_vit


def loop_saliency_sums(model: torch.nn.Module, arch: PrunedArch) -> dict[str, torch.Tensor]:
    """sum of theta * grad over each unit's weights, unit by unit, with the weights written out by hand."""
    p = {name: (param.detach(), param.grad) for name, param in model.named_parameters()}

    def tied(name: str, index) -> torch.Tensor:
        theta, grad = p[name]
        return (theta[index] * grad[index]).sum()

    sums = {group: torch.zeros(size, dtype=torch.float64) for group, size in arch.unit_counts().items()}
    norms = [n[:-len(".weight")] for n in p if n.endswith(".weight") and p[n][0].dim() == 1]
    for c in range(arch.embed_dim):
        total = tied("patch_embed.proj.weight", c) + tied("patch_embed.proj.bias", c)
        total += tied("cls_token", (..., c)) + tied("pos_embed", (..., c)) + tied("head.weight", (slice(None), c))
        for norm in norms:
            total += tied(f"{norm}.weight", c) + tied(f"{norm}.bias", c)
        for i in range(len(arch.blocks)):
            b = f"blocks.{i}"
            total += tied(f"{b}.attn.qkv.weight", (slice(None), c)) + tied(f"{b}.mlp.fc1.weight", (slice(None), c))
            for layer in ("attn.proj", "mlp.fc2"):
                total += tied(f"{b}.{layer}.weight", c) + tied(f"{b}.{layer}.bias", c)
        sums["embed"][c] = total
    for i, w in enumerate(arch.blocks):
        b, qk_rows = f"blocks.{i}", w.heads * w.qk_dim

        def qkv_rows(rows: list[int], b: str = b) -> torch.Tensor:
            return tied(f"{b}.attn.qkv.weight", rows) + tied(f"{b}.attn.qkv.bias", rows)

        for h in range(w.heads):
            q = list(range(h * w.qk_dim, (h + 1) * w.qk_dim))
            v = list(range(2 * qk_rows + h * w.v_dim, 2 * qk_rows + (h + 1) * w.v_dim))
            columns = list(range(h * w.v_dim, (h + 1) * w.v_dim))
            sums[f"{b}.heads"][h] = (qkv_rows(q) + qkv_rows([r + qk_rows for r in q]) + qkv_rows(v)
                                     + tied(f"{b}.attn.proj.weight", (slice(None), columns)))
        for j in range(w.qk_dim):
            rows = [h * w.qk_dim + j for h in range(w.heads)]
            sums[f"{b}.qk"][j] = qkv_rows(rows) + qkv_rows([r + qk_rows for r in rows])
        for j in range(w.v_dim):
            columns = [h * w.v_dim + j for h in range(w.heads)]
            sums[f"{b}.v"][j] = (qkv_rows([2 * qk_rows + c for c in columns])
                                 + tied(f"{b}.attn.proj.weight", (slice(None), columns)))
        for u in range(w.mlp_dim):
            sums[f"{b}.mlp"][u] = (tied(f"{b}.mlp.fc1.weight", u) + tied(f"{b}.mlp.fc1.bias", u)
                                   + tied(f"{b}.mlp.fc2.weight", (slice(None), u)))
    return sums


def authors_code_sums(model: torch.nn.Module, arch: PrunedArch) -> dict[str, torch.Tensor]:
    """The authors' code (NVlabs/NViT, method 23): per unit, the sum of theta * grad over the tensors its
    ``compute_criteria_from`` lists, divided by the kind's divisor (embedding 12, heads 6 x 2, query/key 2,
    value 2, MLP 1), written out by hand with their Q/K/V split of timm's qkv."""
    p = {name: (param.detach(), param.grad) for name, param in model.named_parameters()}

    def tied(name: str, index) -> torch.Tensor:
        theta, grad = p[name]
        return (theta[index] * grad[index]).sum()

    sums = {group: torch.zeros(size, dtype=torch.float64) for group, size in arch.unit_counts().items()}
    for c in range(arch.embed_dim):  # patch embedding (conv rows), attn.proj rows, fc2 rows; Q, K, V and fc1 columns
        total = tied("patch_embed.proj.weight", c) + tied("patch_embed.proj.bias", c)
        for i in range(len(arch.blocks)):
            b = f"blocks.{i}"
            total += tied(f"{b}.attn.qkv.weight", (slice(None), c)) + tied(f"{b}.mlp.fc1.weight", (slice(None), c))
            for layer in ("attn.proj", "mlp.fc2"):
                total += tied(f"{b}.{layer}.weight", c) + tied(f"{b}.{layer}.bias", c)
        sums["embed"][c] = total / 12
    for i, w in enumerate(arch.blocks):
        b, qk_rows = f"blocks.{i}", w.heads * w.qk_dim

        def rows_of(rows: list[int], b: str = b) -> torch.Tensor:
            return tied(f"{b}.attn.qkv.weight", rows) + tied(f"{b}.attn.qkv.bias", rows)

        for h in range(w.heads):  # head_mask (its term zeroed) + the head's Q, K, V rows; /6, then /2 (a Q/V layer)
            q = list(range(h * w.qk_dim, (h + 1) * w.qk_dim))
            v = list(range(2 * qk_rows + h * w.v_dim, 2 * qk_rows + (h + 1) * w.v_dim))
            sums[f"{b}.heads"][h] = (rows_of(q) + rows_of([r + qk_rows for r in q]) + rows_of(v)) / 6 / 2
        for j in range(w.qk_dim):  # the Q layer's rows of channel j in every head; K is only zeroed with it
            sums[f"{b}.qk"][j] = rows_of([h * w.qk_dim + j for h in range(w.heads)]) / 2
        for j in range(w.v_dim):
            sums[f"{b}.v"][j] = rows_of([2 * qk_rows + h * w.v_dim + j for h in range(w.heads)]) / 2
        for u in range(w.mlp_dim):
            sums[f"{b}.mlp"][u] = tied(f"{b}.mlp.fc1.weight", u) + tied(f"{b}.mlp.fc1.bias", u)
    return sums


@pytest.mark.parametrize("reading", ["paper", "code"])
def test_saliency_equals_a_float64_loop_over_units(reading):
    """``paper``: every weight a unit owns (:func:`loop_saliency_sums`); ``code``: the authors' sums, divisors and
    squares (:func:`authors_code_sums`). Both the mean of the squared per-batch sums over 3 batches."""
    torch.manual_seed(0)
    arch = full_arch()
    model = create_pruned_vit(arch, **KWARGS).double()
    axes = unit_axes(model, arch)
    meter = (SaliencyMeter(axes, arch.unit_counts()) if reading == "paper"
             else SaliencyMeter(code_saliency_axes(axes), arch.unit_counts(), CODE_DIVISORS))
    reference = loop_saliency_sums if reading == "paper" else authors_code_sums
    expected = {group: torch.zeros(size, dtype=torch.float64) for group, size in arch.unit_counts().items()}
    for _ in range(3):
        model.zero_grad()
        images, labels = torch.randn(4, 1, 16, 16, dtype=torch.float64), torch.randint(0, 5, (4,))
        F.cross_entropy(model(images), labels).backward()
        meter.add((name, param, param.grad) for name, param in model.named_parameters())
        for group, sums in reference(model, arch).items():
            expected[group] += sums.square() / 3
    saliency = meter.saliency()
    assert set(saliency) == set(expected)
    for group in expected:
        torch.testing.assert_close(saliency[group], expected[group], rtol=1e-10, atol=0)
        assert (expected[group] > 0).all()
    other = authors_code_sums if reading == "paper" else loop_saliency_sums
    assert not torch.allclose(saliency["embed"], other(model, arch)["embed"].square()), "the two readings differ"


def test_on_a_quadratic_loss_the_estimate_is_the_loss_change_of_removing_a_unit():
    """Least squares with unit noise: the Fisher (the mean of squared per-sample gradient sums) is the Hessian,
    so half the saliency of a unit is the exact change of the loss when its weights are set to zero."""
    generator = torch.Generator().manual_seed(0)
    samples, dim = 40000, 6
    x = torch.randn(samples, dim, generator=generator, dtype=torch.float64) @ torch.tensor(
        np.diag([1.0, 2.0, 0.5, 1.5, 1.0, 3.0])) + 0.3
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.3, -1.0, 2.0], dtype=torch.float64)
    y += torch.randn(samples, generator=generator, dtype=torch.float64)
    theta = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)  # the optimum: the mean gradient is 0

    def loss(weights: torch.Tensor) -> torch.Tensor:
        return 0.5 * (y - x @ weights).square().mean()

    units = torch.tensor([0, 0, 1, 1, 2, 2])
    meter = SaliencyMeter({"theta": [UnitAxis(0, "w", units)]}, {"w": 3})
    residual = y - x @ theta
    for index in range(samples):  # one sample per batch
        meter.add([("theta", theta, -residual[index] * x[index])])
    for unit in range(3):
        removed = theta.clone()
        removed[units == unit] = 0
        true_change = loss(removed) - loss(theta)
        assert 0.5 * meter.saliency()["w"][unit] == pytest.approx(float(true_change), rel=0.05)


def linear_table(costs: dict[str, float]) -> LatencyTable:
    """A table whose block latency is sum(cost x width) over a coarse grid (exact under linear interpolation)."""
    grid = {"embed": [1, 64], "heads": [1, 8], "qk": [1, 64], "v": [1, 64], "mlp": [1, 256]}
    attention = np.zeros((2, 2, 2, 2))
    for index in np.ndindex(attention.shape):
        attention[index] = sum(costs[n] * grid[n][i] for n, i in zip(("embed", "heads", "qk", "v"), index))
    mlp = np.array([[costs["mlp"] * m + 0.0 * e for m in grid["mlp"]] for e in grid["embed"]])
    return LatencyTable(model=BASE, device="cpu", batch_size=1, tokens=17, grid=grid,
                        attention_ms=attention.tolist(), mlp_ms=mlp.tolist())


def two_block_arch() -> PrunedArch:
    return PrunedArch(base=BASE, embed_dim=8, blocks=[BlockWidths(heads=4, qk_dim=8, v_dim=8, mlp_dim=16, scale=0.5)] * 2)


def test_groups_go_by_saliency_then_by_latency_saved():
    """Block latency here: 0.208 ms of attention and 16 ms of MLP; the model 32.416 ms."""
    arch = two_block_arch()
    sizes = {"embed": 2, "heads": 1, "qk": 2, "v": 2, "mlp": 4}
    table = linear_table({"embed": 0.001, "heads": 0.01, "qk": 0.01, "v": 0.01, "mlp": 1.0})  # MLP units cost most
    assert table.model_ms(arch) == pytest.approx(32.416)
    scores = {group: torch.ones(size, dtype=torch.float64) for group, size in arch.unit_counts().items()}
    for block in (0, 1):
        scores[f"blocks.{block}.heads"][:] = 3.0
    scores["blocks.1.qk"][[3, 5]] = 0.1  # the least salient pair of units: a group of 0.2
    scores["blocks.0.mlp"][:] = 0.9
    scores["blocks.1.mlp"][[2, 7, 9, 12]] = 0.5
    masks = {group: torch.ones(size) for group, size in arch.unit_counts().items()}
    first = choose_groups(scores, masks, arch, sizes, table, latency_weight=0.0, budget_ms=0.01)
    assert [(c.group, sorted(c.units)) for c in first] == [("blocks.1.qk", [3, 5])]
    assert first[0].saved_ms == pytest.approx(0.02) and first[0].saliency == pytest.approx(0.2)
    assert masks["blocks.1.qk"].tolist() == [1, 1, 1, 0, 1, 0, 1, 1]
    # weight 20: a group of 4 MLP units saves 4 / 32.416 of the latency, lowering its score by 2.47: block 1's
    # least salient units (2.0 - 2.47), then block 0's (3.6 - 2.47) go before any query/key pair (2.0 - 0.01)
    chosen = choose_groups(scores, masks, arch, sizes, table, latency_weight=20.0, budget_ms=7.5)
    assert [(c.group, sorted(c.units)) for c in chosen] == [("blocks.1.mlp", [2, 7, 9, 12]),
                                                           ("blocks.0.mlp", [0, 1, 2, 3])]
    assert [c.saved_ms for c in chosen] == pytest.approx([4.0, 4.0])
    assert arch.kept(masks).blocks[0].mlp_dim == arch.kept(masks).blocks[1].mlp_dim == 12


def test_every_layer_keeps_a_group_and_the_sizes_scale_with_the_model():
    arch = two_block_arch()
    sizes = {"embed": 2, "heads": 1, "qk": 2, "v": 2, "mlp": 4}
    table = linear_table({"embed": 1.0, "heads": 1.0, "qk": 1.0, "v": 1.0, "mlp": 1.0})
    scores = {group: torch.rand(size, dtype=torch.float64) for group, size in arch.unit_counts().items()}
    masks = {group: torch.ones(size) for group, size in arch.unit_counts().items()}
    choose_groups(scores, masks, arch, sizes, table, latency_weight=1.0, budget_ms=1e9)
    left = arch.kept(masks)
    assert left.embed_dim == 2 and all(
        (b.heads, b.qk_dim, b.v_dim, b.mlp_dim) == (1, 2, 2, 4) for b in left.blocks)
    with torch.device("meta"):
        deit_base = PrunedArch.of_vit("deit_base_patch16_224", create_vit("deit_base_patch16_224"))
    assert group_sizes(deit_base) == {"embed": 16, "heads": 2, "qk": 8, "v": 8, "mlp": 16}  # the authors' sizes
    assert group_sizes(full_arch()) == {"embed": 1, "heads": 1, "qk": 1, "v": 1, "mlp": 1}


def test_normalised_saliency_sums_to_one_per_kind_over_kept_units():
    arch = two_block_arch()
    scores = {group: torch.arange(1.0, size + 1, dtype=torch.float64) for group, size in arch.unit_counts().items()}
    masks = {group: torch.ones(size) for group, size in arch.unit_counts().items()}
    masks["blocks.0.mlp"][8:] = 0
    result = normalised(scores, masks)
    mlp = torch.cat([result["blocks.0.mlp"][:8], result["blocks.1.mlp"]])
    assert float(mlp.sum()) == pytest.approx(1.0)
    assert float(result["blocks.1.mlp"][15]) == pytest.approx(16 / (36 + 136))
    assert float(result["embed"].sum()) == pytest.approx(1.0)
