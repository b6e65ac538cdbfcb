"""The speed benchmark's measurements that are not timings: FLOPs and saved activations."""
from __future__ import annotations

import pytest
import torch

from trivit.engine.workflows.benchmark import (
    Measured,
    Mode,
    Runner,
    Variant,
    build_trainables,
    overheads,
    resolve_modes,
    select_variants,
    summary_rows,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trainables():
    return build_trainables("deit_tiny_patch16_224", CPU, semantic=True)


@pytest.mark.parametrize("variant", [Variant("dense (timm)", timm_dense=True), Variant("dense"),
                                     Variant("tokens 0.7", tokens=0.7), Variant("tokens 0.5", tokens=0.5),
                                     Variant("tokens 0.7 + attention 0.2", tokens=0.7, attention=0.2),
                                     Variant("semantic 16", semantic=True)])
def test_analytic_flops_match_torch_flop_counter(variant, trainables):
    analytic, counted = Runner(variant, trainables, 2, CPU).flops_per_image()
    assert analytic == pytest.approx(counted, rel=1e-6), "the analytic count misses or adds a product"


def test_variants_sharing_one_model_each_run_at_their_own_rates(trainables):
    """Runners are interleaved on one shared model: each must put its own keep rates back."""
    rates = (1.0, 0.7, 0.5, 0.7)
    runners = [Runner(Variant(str(rate), tokens=rate), trainables, 2, CPU) for rate in rates]
    saved = [runner.saved_activation_bytes() for runner in runners]
    assert saved[0] > saved[1] > saved[2] and saved[3] == saved[1], "pruning shrinks what backward keeps"
    flops = [runner.flops_per_image()[1] for runner in reversed(runners)]  # counted: rates 0.7, 0.5, 0.7, 1.0
    assert flops[1] < flops[0] == flops[2] < flops[3]


def test_epoch_speedup_and_ceiling_account_for_the_removed_examples():
    def measured(variant, seconds, flops):
        return Measured(variant, step_seconds=[seconds, seconds * 1.1, seconds * 0.9], flops_analytic=flops)

    rows = summary_rows("m", 8, [measured(Variant("dense (timm)", timm_dense=True), 2.0, 100.0),
                                 measured(Variant("examples 20%", removed=0.2), 2.0, 100.0),
                                 measured(Variant("tokens 0.7", tokens=0.7), 1.6, 65.0)])
    assert rows[1]["step_speedup"] == 1.0 and rows[1]["epoch_speedup"] == pytest.approx(1.25)
    assert rows[1]["flops_ceiling"] == pytest.approx(1.25)
    assert rows[2]["step_speedup"] == pytest.approx(1.25) and rows[2]["flops_ceiling"] == pytest.approx(100 / 65)
    assert rows[0]["img_per_s"] == 4.0 and rows[0]["img_per_s_min"] == pytest.approx(8 / 2.2)


def test_overheads_compare_the_right_pairs():
    rows = [{"model": "m", "variant": name, "step_seconds": [seconds]} for name, seconds in
            [("tokens 0.7", 1.0), ("tokens 0.7 + attention 0.2", 1.03), ("dense (trivit blocks)", 2.0),
             ("examples 20%", 2.04)]]
    found = overheads(rows)
    assert found["m: attention 0.2 on top of tokens 0.7"] == pytest.approx(3.0)
    assert found["m: example-level bookkeeping per step"] == pytest.approx(2.0)


def test_no_warmup_steps_is_allowed():
    from trivit.engine.workflows.benchmark import measure_model

    measured = measure_model("deit_tiny_patch16_224", (Variant("dense"),), batch=1, repeats=1, steps=1, warmup=0,
                             device=CPU)
    assert len(measured) == 1 and len(measured[0].step_seconds) == 1 and measured[0].step_seconds[0] > 0


def test_checkpointed_mode_saves_less_for_backward_on_the_same_shared_model(trainables):
    """Modes share the model: each runner sets its own checkpointing (and autocast) before measuring."""
    variant = Variant("tokens 0.7", tokens=0.7)
    plain, checkpointed, bf16 = (Runner(variant, trainables, 2, CPU, mode).saved_activation_bytes()
                                 for mode in (Mode(), Mode(checkpointing=True), Mode(amp_dtype=torch.bfloat16)))
    assert checkpointed < plain / 3, "only the blocks' inputs are kept"
    assert bf16 < plain, "bf16 activations take fewer bytes"
    assert Runner(variant, trainables, 2, CPU).saved_activation_bytes() == plain


def test_speedups_are_over_timm_dense_in_the_same_mode_and_modes_compare_variant_by_variant():
    eager, compiled = Mode(), Mode(compiled=True)
    timm_dense, tokens = Variant("dense (timm)", timm_dense=True), Variant("tokens 0.7", tokens=0.7)
    results = [Measured(timm_dense, eager, [2.0], flops_analytic=100.0), Measured(tokens, eager, [1.6], flops_analytic=65.0),
               Measured(timm_dense, compiled, [1.0], flops_analytic=100.0),
               Measured(tokens, compiled, [0.8], flops_analytic=65.0)]
    rows = summary_rows("m", 8, results)
    assert [r["mode"] for r in rows] == ["eager fp32", "eager fp32", "compiled fp32", "compiled fp32"]
    assert [r["step_speedup"] for r in rows] == pytest.approx([1.0, 1.25, 1.0, 1.25])
    assert [r["vs_first_mode"] for r in rows] == pytest.approx([1.0, 1.0, 2.0, 2.0])
    assert set(overheads(rows)) == set(), "no attention or example pair was measured"


def test_modes_and_variants_from_the_command_line():
    assert resolve_modes("both", "off", ["fp32", "bf16"], CPU) == (
        Mode(False, False, None), Mode(True, False, None), Mode(False, False, torch.bfloat16),
        Mode(True, False, torch.bfloat16))
    assert resolve_modes("off", "on", ["auto"], CPU) == (Mode(False, True, None),)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_modes("off", "off", ["fp16"], CPU)
    assert [v.key for v in select_variants(["all3", "tokens0.7"])] == ["timm", "tokens0.7", "all3"]
    with pytest.raises(ValueError, match="unknown variant 'tokens0.6'.*tokens0.7"):
        select_variants(["tokens0.6"])


def test_explicit_attention_mode_is_the_same_model_computing_its_ranking_explicitly(trainables):
    """The comparison path keeps the numbers (1e-5) and saves the B x H x N x N softmax for backward."""
    variant = Variant("tokens 0.7", tokens=0.7)
    fused, explicit = (Runner(variant, trainables, 2, CPU, Mode(explicit_attention=flag)) for flag in (False, True))
    assert explicit.saved_activation_bytes() > fused.saved_activation_bytes()
    outputs = []
    for runner in (fused, explicit):
        runner.activate()
        with torch.no_grad():
            outputs.append(runner.model(runner.images))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)
    assert resolve_modes("off", "off", ["fp32"], CPU, "both") == (Mode(), Mode(explicit_attention=True))
