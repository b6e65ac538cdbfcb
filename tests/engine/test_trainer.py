"""The trainer end to end on tiny shards: it learns, checkpoints, and resumes exactly."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import tiny_overrides
from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.evaluation import Evaluator
from trivit.engine.metrics import read_metrics
from trivit.engine.state.checkpoint import CheckpointManager
from trivit.engine.trainer import Trainer


def train(shards, run_dir, **extra):
    trainer = Trainer(load(TrainConfig, None, tiny_overrides(shards, run_dir, **extra)))
    return trainer, trainer.train()


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def test_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(tiny_shards, tmp_path):
    # 256 samples / batch 32 = 8 steps per epoch: the interruption at step 5 resumes mid-epoch
    # and the run then crosses an epoch boundary (new shard order, evaluation, checkpoint).
    common = {"data.batch_size": "32", "schedule.max_steps": "12", "checkpoint.every_steps": "5"}
    train(tiny_shards, tmp_path / "full", **common)
    train(tiny_shards, tmp_path / "split", **dict(common, **{"schedule.max_steps": "5"}))
    trainer, _ = train(tiny_shards, tmp_path / "split", **common)
    assert trainer.step == 12
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(full) == list(range(1, 13))
    for step in range(6, 13):
        assert split[step] == full[step], f"step {step}: resumed {split[step]} != uninterrupted {full[step]}"
    full_records = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    split_records = {r["step"]: r for r in read_metrics(tmp_path / "split")}
    assert split_records[12]["eval_top1"] == full_records[12]["eval_top1"]
    assert split_records[12]["eval_top1_ema"] == full_records[12]["eval_top1_ema"]
    seconds = [split_records[step]["train_s"] for step in range(1, 13)]
    assert seconds == sorted(seconds) and seconds[5] > seconds[4] > 0, "training seconds go on counting on resume"
    final_full = CheckpointManager(tmp_path / "full" / "checkpoints", 2).load_latest()[0]["model"]
    final_split = CheckpointManager(tmp_path / "split" / "checkpoints", 2).load_latest()[0]["model"]
    assert all(torch.equal(final_full[k], final_split[k]) for k in final_full)


def test_the_next_epochs_workers_start_before_its_evaluation_and_read_the_same_batches(tiny_shards, tmp_path,
                                                                                      monkeypatch, caplog):
    common = {"data.batch_size": "32", "schedule.epochs": "3"}
    with caplog.at_level(logging.INFO, logger="trivit.engine.train_data"):
        train(tiny_shards, tmp_path / "early", **common)
    firsts = [r.getMessage() for r in caplog.records if "first batch" in r.getMessage()]
    assert len(firsts) == 3 and "started before" not in firsts[0], firsts
    assert all(f"epoch {e}: first batch" in m and "started before the epoch" in m for e, m in [(1, firsts[1]),
                                                                                             (2, firsts[2])])
    monkeypatch.setattr(Trainer, "_start_next_epoch_early", lambda self: None)
    train(tiny_shards, tmp_path / "late", **common)
    early, late = read_metrics(tmp_path / "early"), read_metrics(tmp_path / "late")
    assert [(r["step"], r.get("loss"), r.get("eval_top1")) for r in early] == \
           [(r["step"], r.get("loss"), r.get("eval_top1")) for r in late]


def test_a_fractional_last_epoch_trains_its_first_batches_and_ends_the_lr_schedule_there(tiny_shards, tmp_path):
    # 256 samples / batch 32 = 8 steps an epoch: 1.5 epochs = 8 + 4 steps, the cosine at its floor on the last
    trainer, _ = train(tiny_shards, tmp_path / "run", **{"data.batch_size": "32", "schedule.epochs": "1.5",
                                                         "schedule.warmup_epochs": "0.25", "schedule.min_lr": "1e-5",
                                                         "checkpoint.every_steps": "100"})
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert trainer.step == 12 and [r["step"] for r in records] == list(range(1, 13))
    assert [r["epoch"] for r in records][7:] == [1.0, 1.125, 1.25, 1.375, 1.5]
    evals = [r["step"] for r in read_metrics(tmp_path / "run") if "eval_top1" in r]
    assert evals == [8, 12], "each epoch ends with an evaluation, the fractional one too"
    train(tiny_shards, tmp_path / "two", **{"data.batch_size": "32", "schedule.epochs": "2",
                                            "schedule.warmup_epochs": "0.25", "schedule.min_lr": "1e-5",
                                            "schedule.max_steps": "9", "checkpoint.every_steps": "100"})
    two = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert records[8]["lr"] < 0.5 * two[8]["lr"], "its own, shorter cosine (not two epochs' cut short)"
    assert abs(records[-1]["lr"] - 1e-5) < 1e-4 * 1e-3, "the cosine reaches min_lr at 1.5 epochs"


def test_a_final_dense_phase_trains_the_last_steps_on_every_token_and_link(tiny_shards, tmp_path):
    # 8 steps an epoch, 2 epochs: the rates reach their targets by 0.5 epoch and return to 1.0 at 1.5 (step 12)
    train(tiny_shards, tmp_path / "run", **{"data.batch_size": "32", "schedule.epochs": "2",
                                            "sparsity.tokens.keep_rate": "0.5", "sparsity.attention.keep_rate": "0.5",
                                            "sparsity.schedule.start_epochs": "0", "sparsity.schedule.span_epochs": "0.5",
                                            "sparsity.schedule.final_dense_epochs": "0.5",
                                            "checkpoint.every_steps": "100"})
    rates = {r["step"]: (r["keep_rate_tokens"], r["keep_rate_attention"], r["flops_fraction"])
             for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert all(rates[step][:2] == (0.5, 0.5) and rates[step][2] < 0.8 for step in range(5, 13))
    assert all(rates[step] == (1.0, 1.0, 1.0) for step in range(13, 17))
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_top1" in r]
    assert len(evals) == 2 and not any("eval_attention_density" in r for r in evals), \
        "a run that ends dense is evaluated dense (its every evaluation, at the rates it ends on)"


def test_training_learns_and_writes_the_run_directory(tiny_shards, tmp_path):
    trainer, last = train(tiny_shards, tmp_path / "run", **{"data.mixup": "0", "data.cutmix": "0",
                                                             "optim.lr": "3e-3", "schedule.epochs": "10"})
    records = read_metrics(tmp_path / "run")
    assert {"step", "epoch", "loss", "lr", "img_per_s"} <= set(records[0])
    evals = [r for r in records if "eval_top1" in r]
    assert [r["step"] for r in evals] == [16 * e for e in range(1, 11)], "one evaluation per epoch"
    assert evals[-1]["eval_top1"] >= 90.0, "the bright-quadrant classes are easy to learn"
    assert evals[0]["eval_loss"] > evals[-1]["eval_loss"]
    assert last["step"] == trainer.step == 160
    saved = CheckpointManager(tmp_path / "run" / "checkpoints", 2).saved()
    assert [step for step, _ in saved] == [156, 160], "checkpoint.keep=2 keeps the last two"
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["schedule"]["epochs"] == 10 and resolved["optim"]["lr"] == 3e-3
    assert load(TrainConfig, tmp_path / "run" / "config.yaml") == trainer.config


def test_max_steps_stops_early_without_changing_the_lr_schedule(tiny_shards, tmp_path):
    short, _ = train(tiny_shards, tmp_path / "short", **{"schedule.max_steps": "6"})
    full, _ = train(tiny_shards, tmp_path / "full", **{"schedule.max_steps": "10"})
    lr_short = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "short")}
    lr_full = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "full")}
    assert short.step == 6
    assert all(lr_short[s] == lr_full[s] for s in lr_short)


def test_resume_never_refuses_to_mix_with_existing_checkpoints(tiny_shards, tmp_path):
    train(tiny_shards, tmp_path / "run", **{"schedule.max_steps": "4"})
    with pytest.raises(ValueError, match="resume=never but .* already holds checkpoints"):
        train(tiny_shards, tmp_path / "run", resume="never")


def test_resume_refuses_a_checkpoint_with_other_data_settings(tiny_shards, tmp_path):
    train(tiny_shards, tmp_path / "run", **{"schedule.max_steps": "4"})
    with pytest.raises(ValueError, match="num_workers: 2 -> 1"):
        train(tiny_shards, tmp_path / "run", **{"data.num_workers": "1", "schedule.max_steps": "8"})


def test_resume_refuses_a_checkpoint_of_another_model(tiny_shards, tmp_path):
    train(tiny_shards, tmp_path / "run", **{"schedule.max_steps": "4"})
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004"
    with pytest.raises(ValueError, match="other settings that a resume cannot apply \\(model.timm_kwargs: "
                                         "\\{'embed_dim': 32, .*\\} -> \\{'embed_dim': 48"):
        train(tiny_shards, tmp_path / "other", resume=str(checkpoint),
              **{"model.timm_kwargs": "{embed_dim: 48, depth: 2, num_heads: 2}"})
    state = torch.load(checkpoint / "trainer.pt", weights_only=False)
    del state["config"]  # a checkpoint from before the config was recorded: the weights themselves do not fit
    torch.save(state, checkpoint / "trainer.pt")
    with pytest.raises(ValueError, match="does not fit this model"):
        train(tiny_shards, tmp_path / "older", resume=str(checkpoint),
              **{"model.timm_kwargs": "{embed_dim: 48, depth: 2, num_heads: 2}"})


def test_resume_refuses_settings_it_cannot_apply_and_applies_the_others(tiny_shards, tmp_path, caplog):
    """A new learning rate or a longer schedule would be ignored (the scheduler continues as checkpointed)
    while config.yaml claimed it: the run stops naming them; max_steps and logging apply, and are logged."""
    train(tiny_shards, tmp_path / "run", **{"schedule.max_steps": "4"})
    config_before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="optim.lr: 0.001 -> 0.002; schedule.epochs: 3 -> 6"):
        train(tiny_shards, tmp_path / "run", **{"schedule.max_steps": "8", "optim.lr": "2e-3", "schedule.epochs": "6"})
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before, "config.yaml states what the run does"
    with caplog.at_level(logging.INFO):
        trainer, _ = train(tiny_shards, tmp_path / "run", **{"schedule.max_steps": "6", "logging.every_steps": "2"})
    assert trainer.step == 6 and "resumed with logging.every_steps changed: 1 -> 2" in caplog.text


def test_resume_refuses_data_swapped_under_the_run(tiny_shards, tmp_path):
    train(tiny_shards, tmp_path / "run", **{"schedule.max_steps": "4"})
    index = json.loads((tiny_shards / "index.json").read_text())
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_shards, swapped)
    index["classes"] = ["cat", "dog", "fox", "owl"]
    (swapped / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"the training data changed under this run: .*classes \['class0'"):
        train(swapped, tmp_path / "run", **{"schedule.max_steps": "8"})


ALL_LEVELS = {
    "sparsity.tokens.keep_rate": "0.5", "sparsity.tokens.locations": "[0, 1]", "sparsity.tokens.fuse": "true",
    "sparsity.attention.keep_rate": "0.5", "sparsity.schedule.start_epochs": "0.5",
    "sparsity.schedule.span_epochs": "1", "sparsity.examples.policy": "forgetting",
    "sparsity.examples.refresh_every_epochs": "1", "sparsity.examples.remove_fraction": "0.125",
    "data.batch_size": "32",
}


def test_all_three_levels_resume_exactly_and_shorten_the_epochs(tiny_shards, tmp_path):
    # 256 samples, round(20%) = 51 in the pool: 205 active -> 6 steps of 32 per epoch instead of 8.
    common = dict(ALL_LEVELS, **{"schedule.max_steps": "15", "checkpoint.every_steps": "7"})
    train(tiny_shards, tmp_path / "full", **common)
    train(tiny_shards, tmp_path / "split", **dict(common, **{"schedule.max_steps": "7"}))
    train(tiny_shards, tmp_path / "split", **common)
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert all(split[step] == full[step] for step in range(8, 16))
    records = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    assert records[6]["epoch"] == 1.0 and "eval_top1" in records[6], "an epoch is 6 steps"
    assert {r["active_samples"] for r in records.values()} == {205}
    assert records[1]["keep_rate_tokens"] == 1.0 and records[15]["keep_rate_tokens"] == 0.5
    assert records[15]["tokens_per_block"] == [1 + 8 + 1, 1 + 5 + 1], "16 patches -> 8 + fused -> ceil(9 / 2) + fused"
    assert records[15]["flops_fraction"] < records[1]["flops_fraction"] == 1.0
    # 8 kept patches, k = 4 (ties may add links); then 9 patches (8 + fused) -> 5 kept, k = 3 of 5
    assert records[1]["attention_density"] == {}, "the attention level is off during the warm-up"
    assert 0.5 <= records[15]["attention_density"]["0"] <= 1 and 0.6 <= records[15]["attention_density"]["1"] <= 1
    assert set(records[12]["eval_attention_density"]) == {"0", "1"}
    assert records[12]["eval_attention_density"]["0"] >= 0.5
    scalars = EventAccumulator(str(tmp_path / "full" / "tensorboard")).Reload().Tags()["scalars"]
    assert {"attention_density/0", "attention_density/1", "eval_attention_density/1"} <= set(scalars)
    checkpoint = CheckpointManager(tmp_path / "split" / "checkpoints", 2).load_latest()[0]
    assert checkpoint["examples"]["refreshes"] == 2 and checkpoint["epochs"]["lengths"] == [6, 6, 6]


def test_an_ema_switched_on_at_resume_starts_from_the_resumed_weights(tiny_shards, tmp_path):
    train(tiny_shards, tmp_path / "run", **{"schedule.max_steps": "4", "optim.ema_decay": "null"})
    trainer = Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "run",
                                                             **{"schedule.max_steps": "8", "optim.ema_decay": "0.9"})))
    initial = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    trainer.resume()
    resumed, ema = trainer.model.state_dict(), trainer.ema.module.state_dict()
    assert all(torch.equal(ema[k], resumed[k]) for k in resumed)
    assert not torch.equal(initial["head.weight"], ema["head.weight"]), "not the random initial weights"


def test_a_step_its_checkpoint_commits_is_already_logged(tiny_shards, tmp_path, monkeypatch):
    """The metrics line precedes the checkpoint: a run that dies right after (here: its evaluation
    fails) has logged the step, and the resumed run logs every step once."""
    common = {"schedule.max_steps": "8", "checkpoint.every_steps": "4", "schedule.eval_every_steps": "4"}

    def failing(self, models):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(Evaluator, "evaluate_all", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(tiny_shards, tmp_path / "run", **common)
    assert [step for step, _ in CheckpointManager(tmp_path / "run" / "checkpoints", 2).saved()] == [4]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    monkeypatch.undo()
    train(tiny_shards, tmp_path / "run", **common)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 9)), "each step logged once, the failed evaluation never"
    assert sorted(losses(tmp_path / "run")) == list(range(1, 9))
    assert "eval_top1" in {r["step"]: r for r in records}[8]


def test_a_checkpoint_from_before_newer_settings_resumes_as_it_was_trained(tiny_shards, tmp_path, caplog):
    """A checkpoint written before data.shuffle_initial and data.eval_cache_mb existed (its config and data settings
    lack them): the resume does not refuse it, says so, and its streams keep the whole-buffer first fill they were
    read with, so the losses are those of the uninterrupted run with the old fill."""
    old_fill = {"data.shuffle_buffer": "100", "data.shuffle_initial": "100"}
    train(tiny_shards, tmp_path / "straight", **old_fill, **{"schedule.max_steps": "10"})
    train(tiny_shards, tmp_path / "old", **old_fill, **{"schedule.max_steps": "4"})
    folder = CheckpointManager(tmp_path / "old" / "checkpoints", keep=2).saved()[-1][1]
    state = torch.load(folder / "trainer.pt", weights_only=False)
    del state["data"]["shuffle_initial"]
    for key in ("shuffle_initial", "eval_cache_mb"):
        del state["config"]["data"][key]
    torch.save(state, folder / "trainer.pt")
    with caplog.at_level(logging.INFO):
        trainer, _ = train(tiny_shards, tmp_path / "old", **{"data.shuffle_buffer": "100", "schedule.max_steps": "10"})
    assert trainer.data.shuffle_initial is None
    assert "predates the settings data.eval_cache_mb, data.shuffle_initial" in caplog.text
    resumed, straight = losses(tmp_path / "old"), losses(tmp_path / "straight")
    assert resumed == straight and len(straight) == 10
