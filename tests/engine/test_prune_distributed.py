"""NViT on 2 real processes: a pruned model trains with all three sparsity levels and is pruned further under
DDP, FSDP2 (compiled) and ZeRO-3 with the same losses and the same groups removed as one process."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_overrides
from tests.engine.test_backends_distributed import COMPILED
from tests.engine.test_prune import flops_table, step_losses
from tests.launchers import DISTRIBUTED, ROOT, TOLERANCE, launch_command
from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.workflows.prune import Pruner
from trivit.sparse.pruned import BlockWidths, PrunedArch, create_pruned_vit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PRUNING = {"prune.every_steps": "1", "prune.latency_step": "0.15", "schedule.max_steps": "4",
           "prune.target_latency": "0.2"}
"""A pruning step after every training step; 4 steps do not reach the target, so all 4 prune."""


def pruned_source(folder: Path) -> Path:
    """A pruned model (uneven per-block widths) with random weights, as `trivit export` writes one: the
    weights file and its arch.json beside it."""
    arch = PrunedArch(base="deit_tiny_patch16_224", embed_dim=24, blocks=[
        BlockWidths(heads=2, qk_dim=6, v_dim=10, mlp_dim=40, scale=0.25),
        BlockWidths(heads=2, qk_dim=12, v_dim=8, mlp_dim=72, scale=0.25)])
    folder.mkdir()
    arch.save(folder / "arch.json")
    torch.manual_seed(0)
    model = create_pruned_vit(arch, img_size=16, patch_size=4, in_chans=1, depth=2, num_classes=4)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    return folder / "model.safetensors"


@pytest.mark.parametrize("kind, backend", [("torchrun", {"engine.backend": "ddp"}),
                                           ("fsdp.yaml", {"engine.precision": "fp32", **COMPILED}),
                                           ("torchrun", {"engine.backend": "deepspeed", "engine.zero_stage": "3"})],
                         ids=["ddp", "fsdp_compiled", "zero3"])
def test_a_pruned_model_trains_with_the_three_levels_and_prunes_further_on_two_processes_like_one(
        kind, backend, tiny_shards, tmp_path):
    """The source is itself pruned: the per-block widths train with the token, attention and example levels
    (DISTRIBUTED's) while pruning goes on; 2 ranks give the 1-process losses and remove the same groups."""
    source, table = pruned_source(tmp_path / "source"), flops_table(tmp_path / "table.json")
    settings = {**DISTRIBUTED, **PRUNING, "prune.latency_table": str(table)}
    one = tmp_path / "one"
    pruner = Pruner(load(TrainConfig, None, tiny_overrides(tiny_shards, one, **settings, **{
        "engine.grad_accum_steps": "2", "model.init_from": str(source)})))
    assert PrunedArch.of_vit("deit_tiny_patch16_224", pruner.trainer.model) == PrunedArch.load(source.parent / "arch.json")
    pruner.prune()
    command, env = launch_command(kind, tiny_shards, tmp_path / "two", **backend, **PRUNING,
                                  **{"prune.latency_table": str(table)})
    at = command.index("train")
    command[at:at + 1] = ["prune", "--from", str(source), "--target-latency", PRUNING["prune.target_latency"]]
    run = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert run.returncode == 1 and "not reached" in run.stderr, run.stderr[-3000:]  # 4 steps: the target is not met
    reference, distributed = step_losses(one), step_losses(tmp_path / "two")
    assert sorted(distributed) == [1, 2, 3, 4] and max(abs(distributed[s] - reference[s]) for s in reference) < TOLERANCE
    records = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert records[-1]["tokens_per_block"][-1] < 17 and records[-1]["attention_density"]  # the levels act
    histories = [json.loads((run_dir / "prune.json").read_text())["history"] for run_dir in (one, tmp_path / "two")]
    assert len(histories[0]) == 4
    assert [[(r["group"], r["units"]) for r in event["removed"]] for event in histories[0]] == \
        [[(r["group"], r["units"]) for r in event["removed"]] for event in histories[1]]
