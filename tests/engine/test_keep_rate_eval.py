"""``trivit eval``: a trained run evaluated again, at its own and at other keep rates."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tests.launchers import BIN, ROOT, free_port
from trivit.cli import main
from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.trainer import Trainer

SPARSE_RUN = {"schedule.max_steps": "16", "optim.ema_decay": "null", "sparsity.tokens.keep_rate": "0.5",
              "sparsity.tokens.locations": "[0]", "sparsity.attention.keep_rate": "0.5",
              "sparsity.schedule.start_epochs": "0", "sparsity.schedule.span_epochs": "0.5",
              "data.mixup": "0", "data.cutmix": "0", "optim.lr": "3e-3"}


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, run_dir, **SPARSE_RUN))).train()
    return run_dir


def test_eval_reproduces_the_runs_final_evaluation_at_its_keep_rates(trained_run, tmp_path, capsys):
    final = read_metrics(trained_run)[-1]
    out = tmp_path / "table.json"
    code = main(["eval", str(trained_run), "--keep-rates", "1.0", "0.5", "--attention", "1.0", "0.5", "--repeats", "2",
                 "--per-class", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [(r["keep_rate"], r["attention_keep_rate"]) for r in rows] == [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.5, 0.5)]
    at_training_rates = rows[3]
    assert at_training_rates["top1"] == final["eval_top1"] and at_training_rates["top5"] == final["eval_top5"]
    assert at_training_rates["loss"] == pytest.approx(final["eval_loss"], rel=1e-9)
    assert rows[0]["top1"] != rows[3]["top1"] or rows[0]["loss"] != rows[3]["loss"], "the keep rates change the model"
    assert all(r["img_per_s"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    for row in rows:  # 16 validation images of each of the 4 classes
        assert len(row["top1_per_class"]) == 4 and sum(row["top1_per_class"]) / 4 == pytest.approx(row["top1"])
    assert out.with_suffix(".png").is_file()
    table = capsys.readouterr().out
    assert "| 0.5 | 0.5 |" in table and "64 validation images" in table


def test_eval_of_a_bare_weights_file_needs_its_architecture(trained_run, tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes((trained_run / "model.safetensors").read_bytes())
    assert main(["eval", str(weights), "--data", str(trained_run.parent)]) == 2
    assert "name its timm architecture with --model" in capsys.readouterr().err
    config = load(TrainConfig, trained_run / "config.yaml")
    model = config.model
    code = main(["eval", str(weights), "--model", model.name, "--keep-rates", "0.5", "--attention", "0.5",
                 "--data", config.data.val_urls, "--repeats", "1", f"model.img_size={model.img_size}",
                 f"model.patch_size={model.patch_size}", "model.in_chans=1", "data.mean=[0.3]", "data.std=[0.3]",
                 "data.eval_crop_pct=1.0", "model.timm_kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
                 "sparsity.tokens.locations=[0]"])
    assert code == 0, capsys.readouterr().err
    assert f"| 0.5 | 0.5 | {read_metrics(trained_run)[-1]['eval_top1']:.2f} |" in capsys.readouterr().out
    assert load_file(weights).keys() == load_file(trained_run / "model.safetensors").keys()


@pytest.mark.distributed
def test_eval_under_two_processes_gives_the_same_table(trained_run, tmp_path):
    out = tmp_path / "two.json"
    command = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
               str(free_port()), "-m", "trivit", "eval", str(trained_run), "--keep-rates", "0.5", "--attention", "0.5",
               "--repeats", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    final = read_metrics(trained_run)[-1]
    assert row["top1"] == final["eval_top1"] and row["samples"] == 64, "each image once, over both ranks"
    assert torch.isfinite(torch.tensor(row["img_per_s"]))
