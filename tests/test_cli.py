"""The command line, run as a user runs it: a real subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from trivit.engine.metrics import read_metrics
from trivit.engine.state.checkpoint import load_trainer_state

DEMO = str(Path(__file__).parents[1] / "configs" / "demo.yaml")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trivit", *args], capture_output=True, text=True, timeout=300)


def test_train_through_the_cli_and_resume_a_finished_run(tiny_shards, tmp_path):
    overrides = tiny_overrides(tiny_shards, tmp_path / "run", **{"schedule.max_steps": "6"})
    result = run_cli("train", "--config", DEMO, *overrides)
    assert result.returncode == 0, result.stderr
    last = read_metrics(tmp_path / "run")[-1]
    assert last["step"] == 6 and "eval_top1" in last
    run_dir = tmp_path / "run"
    assert result.stdout.strip().splitlines()[-1] == (
        f"trained to step 6: test top-1 {last['eval_top1']:.2f}% (EMA {last['eval_top1_ema']:.2f}%). The model is "
        f"{run_dir / 'model.safetensors'}, the curves {run_dir / 'metrics.jsonl'}; view them with: tensorboard "
        f"--logdir {run_dir / 'tensorboard'}")
    again = run_cli("train", "--config", DEMO, *overrides)
    assert again.returncode == 0
    assert "finished at step 6" in again.stdout

    exported = run_cli("export", str(tmp_path / "run" / "checkpoints" / "step_00000004"),
                       "--out", str(tmp_path / "w4.safetensors"))
    assert exported.returncode == 0, exported.stderr
    weights = load_file(tmp_path / "w4.safetensors")
    saved = load_trainer_state(tmp_path / "run" / "checkpoints" / "step_00000004")["model"]
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    final = load_file(tmp_path / "run" / "model.safetensors")  # written at the end of training
    model = timm.create_model("deit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=4, in_chans=1,
                              embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)  # demo.yaml's ratio stays
    model.load_state_dict(final, strict=True)
    assert not torch.equal(final["head.weight"], weights["head.weight"]), "step 6 is not step 4"


def test_bad_key_exits_2_with_the_fix(tmp_path):
    result = run_cli("train", "--config", DEMO, f"run_dir={tmp_path}", "optim.lr_rate=1")
    assert result.returncode == 2
    assert "config key 'optim.lr_rate': unknown key (did you mean 'optim.lr'?)" in result.stderr


def test_dry_run_validates_and_counts_steps(tiny_shards, tmp_path):
    result = run_cli("train", "--config", DEMO, "--dry-run",
                     *tiny_overrides(tiny_shards, tmp_path / "run", **{"schedule.epochs": "3"}))
    assert result.returncode == 0, result.stderr
    assert "256 training samples, 3 epochs of up to 16 steps of 16 images" in result.stdout
    assert not (tmp_path / "run").exists()


def test_dry_run_runs_the_shards_per_worker_check(tiny_shards, tmp_path):
    result = run_cli("train", "--config", DEMO, "--dry-run",
                     *tiny_overrides(tiny_shards, tmp_path / "run", **{"data.num_workers": "9"}))
    assert result.returncode == 2
    assert "8 training shards for 1 data-parallel slots (ranks x gradient accumulation steps) x 9 workers" in result.stderr
    assert "Use data.num_workers <= 8, data.resampled=true" in result.stderr
