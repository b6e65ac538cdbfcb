"""NViT on 2 real processes: pruning under DDP, FSDP and ZeRO-2 removes the same groups with the same losses as
one process, and a pruned model trains with all three sparsity levels under DDP and FSDP like one process."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import tiny_overrides
from tests.engine.test_backends_distributed import COMPILED, assert_two_processes_equal_one
from tests.engine.test_prune import flops_table, step_losses
from tests.launchers import DISTRIBUTED, ROOT, TOLERANCE, launch_command
from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.prune import Pruner
from trivit.sparse.pruned import BlockWidths, PrunedArch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PRUNING = {"prune.every_steps": "1", "prune.latency_step": "0.15", "schedule.max_steps": "4",
           "prune.target_latency": "0.3"}
"""A pruning step after every training step; 4 steps do not reach the target, so all 4 prune."""


@pytest.mark.parametrize("kind, backend", [("torchrun", {"engine.backend": "ddp"}),
                                           ("fsdp.yaml", {"engine.precision": "fp32", **COMPILED}),
                                           ("torchrun", {"engine.backend": "deepspeed", "engine.zero_stage": "2"})],
                         ids=["ddp", "fsdp_compiled", "zero2"])
def test_pruning_on_two_processes_equals_one(kind, backend, tiny_shards, tiny_teacher_file, tmp_path):
    table = flops_table(tmp_path / "table.json")
    settings = {**DISTRIBUTED, **PRUNING, "prune.latency_table": str(table)}
    one = tmp_path / "one"
    Pruner(load(TrainConfig, None, tiny_overrides(tiny_shards, one, **settings, **{
        "engine.grad_accum_steps": "2", "model.init_from": str(tiny_teacher_file)}))).prune()
    command, env = launch_command(kind, tiny_shards, tmp_path / "two", **backend, **PRUNING,
                                  **{"prune.latency_table": str(table)})
    at = command.index("train")
    command[at:at + 1] = ["prune", "--from", str(tiny_teacher_file), "--target-latency", PRUNING["prune.target_latency"]]
    run = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert run.returncode == 1 and "not reached" in run.stderr, run.stderr[-3000:]  # 4 steps: the target is not met
    reference, distributed = step_losses(one), step_losses(tmp_path / "two")
    assert sorted(distributed) == [1, 2, 3, 4] and max(abs(distributed[s] - reference[s]) for s in reference) < TOLERANCE
    histories = [json.loads((run_dir / "prune.json").read_text())["history"] for run_dir in (one, tmp_path / "two")]
    assert len(histories[0]) == 4
    assert [[(r["group"], r["units"]) for r in event["removed"]] for event in histories[0]] == \
        [[(r["group"], r["units"]) for r in event["removed"]] for event in histories[1]]


@pytest.mark.parametrize("kind, backend", [("torchrun", {"engine.backend": "ddp"}),
                                           ("fsdp.yaml", {"engine.precision": "fp32", **COMPILED})],
                         ids=["ddp", "fsdp_compiled"])
def test_a_pruned_model_trains_with_the_three_levels_on_two_processes_like_one(kind, backend, tiny_shards, tmp_path):
    arch = PrunedArch(base="deit_tiny_patch16_224", embed_dim=24, blocks=[
        BlockWidths(heads=2, qk_dim=6, v_dim=10, mlp_dim=40, scale=0.25),
        BlockWidths(heads=1, qk_dim=12, v_dim=8, mlp_dim=72, scale=0.25)])
    arch.save(tmp_path / "arch.json")
    assert_two_processes_equal_one(kind, backend, {"model.arch": str(tmp_path / "arch.json"), "schedule.max_steps": "4"},
                                   tiny_shards, tmp_path)
