"""The large-model path in the trainer: torch.compile (graphs bounded over a ramp, eager's losses),
activation checkpointing (the same losses), bf16 on the CPU, and the start-up choices they imply."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.launchers import ROOT
from trivit.config import ConfigError, load
from trivit.engine.compile import compiled_graphs, graph_bound
from trivit.engine.config import TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.startup import resolve_run
from trivit.engine.trainer import Trainer
from trivit.sparse import TapRequest, create_vit
from trivit.sparse.schedule import scheduled_keep_rate

RAMP = {  # 16 steps per epoch: the rates fall from step 1 to step 16, then stay at the targets
    "model.timm_kwargs": "{embed_dim: 32, depth: 4, num_heads: 2}", "optim.ema_decay": "null",
    "sparsity.tokens.keep_rate": "0.5", "sparsity.tokens.locations": "[1, 2]", "sparsity.attention.keep_rate": "0.5",
    "sparsity.schedule.start_epochs": "0", "sparsity.schedule.span_epochs": "1", "schedule.max_steps": "24",
    "data.eval_batch_size": "24", "schedule.eval_every_steps": "12",
}


def run(shards, run_dir, **extra):
    trainer = Trainer(load(TrainConfig, None, tiny_overrides(shards, run_dir, **dict(RAMP, **extra))))
    trainer.train()
    return trainer, read_metrics(run_dir)


def config(shards, tmp_path, **extra):
    return load(TrainConfig, None, tiny_overrides(shards, tmp_path, **extra))


def test_compiled_run_crosses_the_ramp_with_few_graphs_and_the_eager_losses(tiny_shards, tmp_path):
    """Quantised ramp: 4 rates below 1.0, so at most graph_bound(4) = 7 graphs over the whole run (training
    at 5 rates, evaluation at the targets, the evaluation's last odd-sized batch); losses as eager to 1e-6."""
    _, eager = run(tiny_shards, tmp_path / "eager", **{"sparsity.schedule.levels": "4"})
    before = compiled_graphs()  # dynamo counts the graphs of the whole process
    trainer, compiled = run(tiny_shards, tmp_path / "compiled", **{"engine.compile": "true",
                                                                   "engine.compile_backend": "aot_eager"})
    assert trainer.config.sparsity.schedule.levels == 4, "engine.compile quantises the ramp by default"
    rates = [r["keep_rate_tokens"] for r in compiled]
    assert sorted(set(rates)) == [0.5, 0.625, 0.75, 0.875, 1.0] and rates[-1] == 0.5
    graphs = [r["compiled_graphs"] - before for r in compiled]
    assert graphs == sorted(graphs) and 5 <= graphs[-1] <= graph_bound(4) == 7
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == list(range(1, 25))
    for ours, theirs in zip(compiled, eager):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-6), ours["step"]
    assert compiled[11]["eval_top1"] == eager[11]["eval_top1"]


def test_routed_model_compiles_to_one_graph_without_breaks():
    """All three levels' model code, with checkpointing and [CLS] recording, traces whole: no graph break."""
    sparsity = {"tokens": {"keep_rate": 0.7, "locations": [1, 3], "fuse": True}, "attention": {"keep_rate": 0.3}}
    model = create_vit("deit_tiny_patch16_224", sparsity, img_size=64, depth=5, num_classes=4).train()
    model.set_grad_checkpointing()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64), taps=TapRequest(cls_attention=True, cls_at=2))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_inductor_step_equals_eager():
    """The default backend's generated code: one training step's loss and gradients as eager (fp32, 1e-5)."""
    sparsity = {"tokens": {"keep_rate": 0.5, "locations": [0], "fuse": True}, "attention": {"keep_rate": 0.5}}
    model = create_vit("deit_tiny_patch16_224", sparsity, img_size=16, patch_size=4, in_chans=1, embed_dim=32,
                       depth=2, num_heads=2, num_classes=4, drop_path_rate=0.0).train()
    images, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    results = []
    for compiled in (False, True):
        model.zero_grad()
        forward = torch.compile(model, backend="inductor") if compiled else model
        loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_activation_checkpointing_trains_to_the_same_losses(tiny_shards, tmp_path):
    """Drop-path and the random selector draw inside the checkpointed blocks: their RNG is restored."""
    extra = {"schedule.max_steps": "6", "sparsity.tokens.selector": "random", "model.drop_path_rate": "0.2"}
    _, plain = run(tiny_shards, tmp_path / "plain", **extra)
    trainer, checkpointed = run(tiny_shards, tmp_path / "ckpt", **extra, **{"engine.activation_checkpointing": "true"})
    assert trainer.model.blocks.grad_checkpointing
    assert [r["loss"] for r in checkpointed] == [r["loss"] for r in plain]


def test_bf16_on_the_cpu_follows_fp32(tiny_shards, tmp_path):
    """Autocast bf16 on the CPU: the same run's losses within 5e-3 of fp32's over 8 steps (measured:
    4e-4). In its own process: Accelerate fixes one mixed precision per process."""
    extra = {"schedule.max_steps": "8", "data.mixup": "0", "data.cutmix": "0", "model.drop_path_rate": "0"}
    _, fp32 = run(tiny_shards, tmp_path / "fp32", **extra, **{"engine.precision": "fp32"})
    args = tiny_overrides(tiny_shards, tmp_path / "bf16", **dict(RAMP, **extra, **{"engine.precision": "bf16"}))
    subprocess.run([sys.executable, "-m", "trivit", "train", *args], check=True, capture_output=True, timeout=300,
                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    bf16 = read_metrics(tmp_path / "bf16")
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(bf16, fp32)]
    assert len(differences) == 8 and max(differences) < 5e-3 and 0 < sum(differences), differences


def test_quantised_ramp_holds_each_rate_until_the_cosine_passes_it():
    values = [scheduled_keep_rate(t / 100, 0.7, 0.0, 1.0, levels=3) for t in range(0, 121)]
    assert sorted(set(values), reverse=True) == pytest.approx([1.0, 0.9, 0.8, 0.7])
    assert values[-1] == 0.7 and all(a >= b for a, b in zip(values, values[1:]))
    continuous = [scheduled_keep_rate(t / 100, 0.7, 0.0, 1.0) for t in range(0, 121)]
    assert all(q >= c - 1e-12 for q, c in zip(values, continuous)), "never prunes more than the cosine"
    assert scheduled_keep_rate(0.5, 1.0, 0.0, 1.0, levels=3) == 1.0


def test_startup_resolves_and_refuses_the_compiled_path_choices(tiny_shards, tmp_path):
    setup = resolve_run(config(tiny_shards, tmp_path, **{"engine.compile": "true"}))
    assert setup.config.sparsity.schedule.levels == 4 and setup.config.sparsity.attention.kernel == "sdpa"
    kept = resolve_run(config(tiny_shards, tmp_path, **{"engine.compile": "true", "sparsity.schedule.levels": "2"}))
    assert kept.config.sparsity.schedule.levels == 2
    assert resolve_run(config(tiny_shards, tmp_path)).config.sparsity.schedule.levels is None
    with pytest.raises(ConfigError, match="flex_attention has no backward on the CPU; use 'sdpa'"):
        resolve_run(config(tiny_shards, tmp_path, **{"sparsity.attention.kernel": "flex"}))
    with pytest.raises(ConfigError, match="engine.compile_backend.*'nope'"):
        resolve_run(config(tiny_shards, tmp_path, **{"engine.compile": "true", "engine.compile_backend": "nope"}))
