"""The speed benchmark's measurements that are not timings: FLOPs and saved activations."""
from __future__ import annotations

import pytest
import torch

from trivit.engine.benchmark import Measured, Runner, Variant, build_trainables, overheads, summary_rows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trainables():
    return build_trainables("deit_tiny_patch16_224", CPU)


@pytest.mark.parametrize("variant", [Variant("dense (timm)", timm_dense=True), Variant("dense"),
                                     Variant("tokens 0.7", tokens=0.7), Variant("tokens 0.5", tokens=0.5),
                                     Variant("tokens 0.7 + attention 0.2", tokens=0.7, attention=0.2)])
def test_analytic_flops_match_torch_flop_counter(variant, trainables):
    analytic, counted = Runner(variant, trainables, 2, CPU, None).flops_per_image()
    assert analytic == pytest.approx(counted, rel=1e-6), "the analytic count misses or adds a product"


def test_variants_sharing_one_model_each_run_at_their_own_rates(trainables):
    """Runners are interleaved on one shared model: each must put its own keep rates back."""
    rates = (1.0, 0.7, 0.5, 0.7)
    runners = [Runner(Variant(str(rate), tokens=rate), trainables, 2, CPU, None) for rate in rates]
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
    from trivit.engine.benchmark import measure_model

    measured = measure_model("deit_tiny_patch16_224", (Variant("dense"),), batch=1, repeats=1, steps=1, warmup=0,
                             device=CPU, amp_dtype=None)
    assert len(measured) == 1 and len(measured[0].step_seconds) == 1 and measured[0].step_seconds[0] > 0
