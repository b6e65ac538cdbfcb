"""``trivit prune`` end to end: the target met by the table, the stripped model and its arch.json, exact
resume, and the pruned model fine-tuned, evaluated and exported."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tests.faults.test_process_faults import read_metrics
from trivit.cli import main
from trivit.config import ConfigError, load
from trivit.engine.config import TrainConfig
from trivit.engine.model.artefacts import UNIT_MASKS, find_checkpoint
from trivit.engine.model.export import export
from trivit.engine.optim import build_optimizer
from trivit.engine.state.checkpoint import load_trainer_state
from trivit.engine.trainer import Trainer
from trivit.engine.workflows.prune import Pruner
from trivit.sparse.latency import LatencyTable
from trivit.sparse.pruned import PrunedArch, create_pruned_vit, pruned_entries, unit_axes

TOKENS = 17
MODEL_KWARGS = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=4)
PRUNE = {"optim.ema_decay": "null", "prune.every_steps": "2", "prune.latency_step": "0.2",
         "schedule.max_steps": "40", "data.mixup": "0", "data.cutmix": "0", "checkpoint.every_steps": "2"}


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def flops_table(path: Path) -> Path:
    """A latency table proportional to each part's multiply-adds: multilinear in the widths, so exact."""
    grid = {"embed": [1, 32], "heads": [1, 2], "qk": [1, 16], "v": [1, 16], "mlp": [1, 128]}
    attention = np.zeros((2, 2, 2, 2))
    for index in np.ndindex(attention.shape):
        e, h, q, v = (grid[n][i] for n, i in zip(("embed", "heads", "qk", "v"), index))
        attention[index] = 1e-3 * (TOKENS * e * h * (2 * q + v) + TOKENS * h * v * e + TOKENS * TOKENS * h * (q + v))
    mlp = np.array([[1e-3 * 2 * TOKENS * e * m for m in grid["mlp"]] for e in grid["embed"]])
    LatencyTable(model="deit_tiny_patch16_224", device="cpu", batch_size=1, tokens=TOKENS, grid=grid,
                 attention_ms=attention.tolist(), mlp_ms=mlp.tolist()).save(path)
    return path


@pytest.fixture(scope="module")
def source_run(tiny_shards, tmp_path_factory) -> Path:
    """A trained tiny model (6 steps)."""
    run_dir = tmp_path_factory.mktemp("source")
    Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, run_dir, **{"schedule.max_steps": "6"}))).train()
    return run_dir


@pytest.fixture(scope="module")
def table_file(tmp_path_factory) -> Path:
    return flops_table(tmp_path_factory.mktemp("table") / "table.json")


def prune_args(shards: Path, run_dir: Path, source: Path, table: Path, **extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(shards, run_dir, **dict(PRUNE, **extra)) if not o.startswith("run_dir=")]
    return ["prune", "--from", str(source), "--target-latency", "0.5", "--latency-table", str(table),
            "--out", str(run_dir), *overrides]


@pytest.fixture(scope="module")
def pruned_run(tiny_shards, source_run, table_file, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pruned")
    assert main(prune_args(tiny_shards, run_dir, source_run, table_file)) == 0
    return run_dir


def test_prune_meets_the_target_by_the_table_and_writes_the_stripped_model(pruned_run, table_file):
    table = LatencyTable.load(table_file)
    full = PrunedArch.load(pruned_run / "arch.json").with_counts(
        {"embed": 32, **{f"blocks.{i}.{k}": n for i in range(2)
                         for k, n in (("heads", 2), ("qk", 16), ("v", 16), ("mlp", 128))}})
    arch = PrunedArch.load(pruned_run / "arch.json")
    assert table.model_ms(arch) / table.model_ms(full) <= 0.5
    summary = json.loads((pruned_run / "prune.json").read_text())
    assert summary["target_met"] and summary["latency_fraction"] == pytest.approx(table.model_ms(arch) / table.model_ms(full))
    fractions = [event["latency_fraction"] for event in summary["history"]]
    assert fractions == sorted(fractions, reverse=True) and len(fractions) >= 3  # 0.2 of the latency per event
    assert all(event["step"] % 2 == 0 for event in summary["history"])
    assert summary["steps"] == summary["history"][-1]["step"], "it stops at the step that meets the target"
    model = create_pruned_vit(arch, **MODEL_KWARGS)
    model.load_state_dict(load_file(pruned_run / "model.safetensors"), strict=True)
    assert sum(p.numel() for p in model.parameters()) < 0.75 * sum(
        p.numel() for p in create_pruned_vit(full, **MODEL_KWARGS).parameters())


def test_the_pruned_run_fine_tunes_and_exports_with_its_architecture(pruned_run, tiny_shards, tmp_path):
    arch = PrunedArch.load(pruned_run / "arch.json")
    config = load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **{
        "model.init_from": str(pruned_run), "schedule.max_steps": "3", "sparsity.tokens.keep_rate": "0.5",
        "sparsity.tokens.locations": "[1]", "sparsity.attention.keep_rate": "0.5",
        "sparsity.schedule.start_epochs": "0", "sparsity.schedule.span_epochs": "0"}))
    trainer = Trainer(config)
    assert PrunedArch.of_vit("deit_tiny_patch16_224", trainer.model) == arch
    assert trainer.init_record["init_from"].startswith("trivit checkpoint")
    record = trainer.train()
    assert record["tokens_per_block"] == [17, 9]  # the token level acts on the pruned model
    assert PrunedArch.load(tmp_path / "arch.json") == arch  # the export at the end writes it beside the weights
    out = export(find_checkpoint(tmp_path), tmp_path / "again" / "model.safetensors")
    assert PrunedArch.load(out.parent / "arch.json") == arch
    assert load_file(out).keys() == load_file(tmp_path / "model.safetensors").keys()


def test_pruning_resumes_exactly(tiny_shards, source_run, table_file, pruned_run, tmp_path):
    """Stopped after 3 steps (schedule.max_steps, which changes no schedule), then resumed to the end."""
    assert main(prune_args(tiny_shards, tmp_path, source_run, table_file, **{"schedule.max_steps": "3"})) == 1
    assert main(prune_args(tiny_shards, tmp_path, source_run, table_file)) == 0
    assert step_losses(tmp_path) == step_losses(pruned_run) and len(step_losses(pruned_run)) == 6
    resumed, uninterrupted = (json.loads((run / "prune.json").read_text()) for run in (tmp_path, pruned_run))
    assert resumed["history"] == uninterrupted["history"]  # the same groups removed at the same steps
    assert PrunedArch.load(tmp_path / "arch.json") == PrunedArch.load(pruned_run / "arch.json")


def test_a_target_below_the_tables_floor_is_refused_at_start_up(tiny_shards, source_run, table_file, tmp_path, capsys):
    """The smallest architecture prune.min_widths allows has a latency: a target below it could never be met
    (the run hollowed the model out to chance accuracy and trained on)."""
    args = prune_args(tiny_shards, tmp_path / "run", source_run, table_file)
    args[args.index("--target-latency") + 1] = "0.02"
    assert main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "prune.target_latency': got 0.02, but the table's floor is" in err and "ask for >=" in err
    assert "measure the table at the batch and token count you train with" in err
    assert main(args) == 2 and not (tmp_path / "run" / "checkpoints").exists()
    capsys.readouterr()
    assert main([*prune_args(tiny_shards, tmp_path / "run", source_run, table_file), "--dry-run"]) == 0
    assert "config valid; pruning to 0.5 of the unpruned block latency (the table's floor" in capsys.readouterr().out


def test_pruning_stops_when_accuracy_collapses_or_nothing_can_go(tiny_shards, source_run, table_file, tmp_path):
    config = load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **{
        **PRUNE, "model.init_from": str(source_run), "prune.latency_table": str(table_file)}))
    pruner = Pruner(config)
    objective = pruner.objective
    objective.start_top1 = 80.0
    objective.observe_evaluation({"eval_top1": 60.0})
    assert not objective.stopped and not pruner.trainer.finished()
    objective.observe_evaluation({"eval_top1": 30.0})
    assert "top-1 fell to 30.00%, below prune.min_accuracy=0.5 of the unpruned model's 80.00%" in objective.stopped
    assert pruner.trainer.finished()


def test_every_pruning_step_is_logged_and_evaluated(pruned_run):
    records = read_metrics(pruned_run)
    steps = [r for r in records if "prune/latency_fraction" in r]
    assert steps and all({"prune/embed", "prune/heads", "prune/mlp"} <= r.keys() for r in steps)
    fractions = [r["prune/latency_fraction"] for r in steps]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > fractions[-1]
    evaluated = {r["step"] for r in records if "eval_top1" in r}
    assert {2, 4} <= evaluated, "each pruning step (every 2 steps) is evaluated"
    assert json.loads((pruned_run / "prune.json").read_text())["start_top1"] is not None


def test_a_noisy_latency_table_is_measured_again_then_refused(monkeypatch, tmp_path, capsys):
    from trivit.sparse import latency

    calls = []

    def noisy(*args, **kwargs):
        calls.append(args[-1])
        table = LatencyTable.load(flops_table(tmp_path / "t.json"))
        return dataclasses.replace(table, monotone_correction=187.73, correction_of_full=0.9)

    monkeypatch.setattr(latency, "measure_latency_table", noisy)
    assert main(["bench", "latency-table", "--model", "deit_tiny_patch16_224", "--repeats", "3", "--out",
                 str(tmp_path / "noisy.json"), "model.img_size=16", "model.patch_size=4", "model.in_chans=1",
                 "model.timm_kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "data.mean=[0.3]", "data.std=[0.3]"]) == 2
    assert calls == [3, 9], "measured again with 3x the repeats"
    assert ("too noisy to steer pruning: a block part measured faster than a narrower one by 90% of the full part's "
            "time (bound 50%; 18773% of the narrower part's own)") in capsys.readouterr().err
    assert not (tmp_path / "noisy.json").exists()


def test_a_latency_table_changed_under_a_pruning_run_is_refused_at_resume(tiny_shards, source_run, tmp_path, capsys):
    """The steps so far were chosen by the first table: a resume with another one would mix two pruning runs."""
    table = flops_table(tmp_path / "table.json")
    assert main(prune_args(tiny_shards, tmp_path / "run", source_run, table, **{"schedule.max_steps": "2"})) == 1
    changed = json.loads(table.read_text())
    changed["mlp_ms"] = [[2 * value for value in row] for row in changed["mlp_ms"]]
    table.write_text(json.dumps(changed))
    capsys.readouterr()
    assert main(prune_args(tiny_shards, tmp_path / "run", source_run, table, **{"schedule.max_steps": "4"})) == 2
    assert "the latency table this pruning run started with differs" in capsys.readouterr().err


def test_what_cannot_compose_with_pruning_is_refused_at_start_up(tiny_shards, source_run, table_file, tmp_path):
    def config(**extra: str) -> TrainConfig:
        settings = {**PRUNE, "model.init_from": str(source_run), "prune.latency_table": str(table_file), **extra}
        return load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **settings))

    with pytest.raises(ConfigError, match="optim.ema_decay"):
        Pruner(config(**{"optim.ema_decay": "0.9"}))
    with pytest.raises(ConfigError, match="distill.loss"):
        Pruner(config(**{"distill.loss": "uskd"}))
    with pytest.raises(ConfigError, match="model.init_from.*--from"):
        Pruner(config(**{"model.init_from": "null"}))
    narrow = LatencyTable.load(table_file)
    narrow.grid["embed"] = [1, 16]  # measured for a model of half the width
    narrow.save(tmp_path / "narrow.json")
    with pytest.raises(ValueError, match="reaches widths.*embed.*bench latency-table"):
        Pruner(config(**{"prune.latency_table": str(tmp_path / "narrow.json")}))
    assert not (tmp_path / "checkpoints").exists()


def test_a_model_arch_that_is_not_the_model_name_is_refused(pruned_run, tiny_shards, tmp_path):
    config = load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **{
        "model.arch": str(pruned_run / "arch.json"), "model.name": "deit_small_patch16_224"}))
    with pytest.raises(ConfigError, match="model.name.*pruned from 'deit_tiny_patch16_224'"):
        Trainer(config)


def test_the_latency_table_measured_here_is_monotone_and_fits_its_grid(tmp_path):
    assert main(["bench", "latency-table", "--model", "deit_tiny_patch16_224", "--batch", "2", "--repeats", "3",
                 "--max-correction", "1000", "--out", str(tmp_path / "t.json"),
                 "model.img_size=16", "model.patch_size=4", "model.in_chans=1",
                 "model.timm_kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "data.mean=[0.3]", "data.std=[0.3]"]) == 0
    table = LatencyTable.load(tmp_path / "t.json")
    assert table.grid == {"embed": [1, 8, 16, 24, 32], "heads": [1, 2], "qk": [2, 4, 8, 12, 16],
                          "v": [2, 4, 8, 12, 16], "mlp": [1, 32, 64, 96, 128]}
    for values in (np.asarray(table.attention_ms), np.asarray(table.mlp_ms)):
        for axis in range(values.ndim):
            assert (np.diff(values, axis=axis) >= 0).all()
    assert table.tokens == 17 and torch.tensor(table.attention_ms).min() > 0


def test_trivit_eval_of_the_pruned_run_scores_what_the_masked_model_scored(pruned_run, tmp_path):
    """The run's last evaluation was of the masked model; `trivit eval` builds the stripped one from arch.json."""
    assert main(["eval", str(pruned_run), "--keep-rates", "1.0", "--repeats", "1", "--out", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())
    masked = [r for r in read_metrics(pruned_run) if "eval_top1" in r][-1]
    assert rows[0]["top1"] == pytest.approx(masked["eval_top1"]) and rows[0]["loss"] == pytest.approx(
        masked["eval_loss"], abs=1e-5)


def test_the_checkpoint_holds_zeros_for_every_pruned_unit_and_its_optimizer_state(pruned_run):
    state = load_trainer_state(find_checkpoint(pruned_run))
    masks, record = state["objective"][UNIT_MASKS], state["arch"]
    arch = PrunedArch(**record["arch"])
    model = create_pruned_vit(arch, **record["timm_kwargs"])
    optimizer = build_optimizer(model, load(TrainConfig, pruned_run / "config.yaml").optim, 16)
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    axes = unit_axes(model, arch)
    zeroed = 0
    for name, param in model.named_parameters():
        if name not in axes:
            continue
        pruned = pruned_entries(param.shape, axes[name], masks)
        moments = state["optimizer"]["state"][index[id(param)]]
        for tensor in (state["model"][name], moments["exp_avg"], moments["exp_avg_sq"]):
            assert torch.count_nonzero(tensor[pruned]) == 0, name
        zeroed += int(pruned.sum())
    assert zeroed > 0


def test_model_arch_with_the_exported_weights_builds_the_same_model(pruned_run, tiny_shards, tmp_path):
    config = load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **{
        "model.arch": str(pruned_run / "arch.json"), "model.init_from": str(pruned_run / "model.safetensors")}))
    trainer = Trainer(config)
    assert PrunedArch.of_vit("deit_tiny_patch16_224", trainer.model) == PrunedArch.load(pruned_run / "arch.json")
    weights = load_file(pruned_run / "model.safetensors")
    assert all(torch.equal(weights[name], value) for name, value in trainer.model.state_dict().items())


def test_code_saliency_loss_and_moving_average_follow_the_authors_code(tiny_shards, source_run, table_file, tmp_path):
    """``prune.saliency=code``: label loss alone until the first pruning step, then label + 1e5 x KL(teacher ||
    student) at T = 3 averaged over the classes (torch's KLDivLoss 'mean', no T^2); scores 0.9 x the previous
    step's + 0.1 x this step's; lambda 5e-4 per millisecond of the table."""
    config = load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **{
        **PRUNE, "model.init_from": str(source_run), "prune.latency_table": str(table_file),
        "prune.saliency": "code"}))
    objective = Pruner(config).objective
    torch.manual_seed(0)
    images, logits, labels = torch.randn(3, 1, 16, 16), torch.randn(3, 4), torch.tensor([0.3, 0.7, 1.1])
    targets = torch.eye(4)[:3]
    assert torch.equal(objective.objective(labels, logits, images, targets), labels)
    objective.history.append({"step": 2})  # a pruning step has happened: the KL is on
    with torch.no_grad():
        teacher = objective.teacher(images).double() / 3
    student = logits.double() / 3
    p_teacher = teacher.softmax(-1)
    kl = (p_teacher * (p_teacher.log() - student.log_softmax(-1))).sum(-1) / 4
    torch.testing.assert_close(objective.objective(labels, logits, images, targets).double(),
                               labels.double() + 1e5 * kl, rtol=1e-5, atol=1e-6)

    masks = {g: torch.ones_like(m) for g, m in objective.masks.items()}
    first = {g: torch.rand_like(t) for g, t in objective.meter.totals.items()}
    second = {g: torch.rand_like(t) for g, t in objective.meter.totals.items()}
    for totals, expected in ((first, first), (second, {g: 0.9 * first[g] + 0.1 * second[g] for g in first})):
        objective.meter.totals, objective.meter.batches = {g: t * 2 for g, t in totals.items()}, 2
        scores = objective._scores(masks)
        for group in expected:
            torch.testing.assert_close(scores[group], expected[group], rtol=1e-12, atol=0)
    assert objective._latency_weight() / objective.base_ms == pytest.approx(5e-4)
