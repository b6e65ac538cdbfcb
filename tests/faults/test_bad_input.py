"""Bad input, one table: every case fails before training with a message naming the problem and the fix."""
from __future__ import annotations

import pytest

from tests.conftest import tiny_overrides
from trivit.config import ConfigError, load
from trivit.engine.config import TrainConfig
from trivit.engine.trainer import Trainer

ONE_RANK = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
TWO_RANKS = dict(ONE_RANK, WORLD_SIZE="2")
"""The environment of rank 0 of 2; every case below fails before joining the (absent) other rank."""

CASES = [
    # (overrides, environment, error type, text the message must contain)
    ({"optim.lr_rate": "1"}, {}, ConfigError, "unknown key (did you mean 'optim.lr'?)"),
    ({"model.timm_kwargs": "{embed_dim:"}, {}, ConfigError, "value '{embed_dim:' is not valid YAML"),
    ({"data.batch_size": "big"}, {}, ConfigError, "'data.batch_size': got 'big' (str); expected int"),
    ({"sparsity.tokens.keep_rate": "1.5"}, {}, ConfigError,
     "'sparsity.tokens.keep_rate': got 1.5; allowed: a fraction in (0, 1]"),
    ({"sparsity.attention.keep_rate": "0"}, {}, ConfigError,
     "'sparsity.attention.keep_rate': got 0.0; allowed: a fraction in (0, 1]"),
    ({"sparsity.tokens.keep_rate": "0.7", "sparsity.tokens.locations": "[1, 3]"}, {}, ConfigError,
     "'sparsity.tokens.locations': got [1, 3]; blocks [3] do not exist (the model has 2 blocks, indices 0..1)"),
    ({"model.img_size": "18"}, {}, ConfigError, "'model.img_size': got 18; allowed: a multiple of model.patch_size (4)"),
    ({"model.img_size": "30", "model.patch_size": "null"}, {}, ConfigError,
     "'model.img_size': got 30; allowed: a multiple of the patch size (16)"),
    ({"engine.backend": "gpu"}, {}, ConfigError, "allowed: 'auto' | 'single' | 'ddp' | 'fsdp' | 'deepspeed'"),
    ({"engine.backend": "fsdp"}, {}, ConfigError, "got 'fsdp' but this is a single process"),
    ({}, {"ACCELERATE_USE_FSDP": "true"}, ConfigError, "'accelerate launch --cpu' starts one process"),
    ({"engine.backend": "ddp"}, {"ACCELERATE_USE_FSDP": "true", **TWO_RANKS}, ConfigError,
     "the accelerate config that launched trivit asks for 'fsdp'"),
    ({}, {"WORLD_SIZE": "2", "RANK": "0"}, ValueError,
     "MASTER_ADDR/MASTER_PORT are not set; start trivit through a launcher"),
    ({"engine.backend": "single"}, TWO_RANKS, ConfigError, "got 'single' but the launcher started 2 processes"),
    ({"engine.backend": "deepspeed"}, {}, ConfigError, "'deepspeed' without a distributed environment"),
    ({"engine.backend": "fsdp"}, TWO_RANKS, ConfigError, "an EMA of the weights needs the whole model on every rank"),
    ({"engine.backend": "deepspeed", "engine.deepspeed_config": "/nonexistent/ds.json"}, ONE_RANK, FileNotFoundError,
     "engine.deepspeed_config: no such file '/nonexistent/ds.json'"),
    ({"engine.grad_accum_steps": "4", "data.batch_size": "18"}, {}, ConfigError,
     "got 18, not divisible by world size 1 x engine.grad_accum_steps 4 = 4; use a multiple of 4"),
    ({"engine.grad_accum_steps": "2", "data.batch_size": "18"}, {}, ConfigError,
     "mixup/cutmix pair the images of each micro-batch, which has 9 (odd) here"),
    ({"data.batch_size": "512"}, {}, ConfigError, "'data.batch_size': got 512, larger than the 256 training samples"),
    ({"data.mean": "[0.5, 0.5, 0.5]", "data.std": "[0.2, 0.2, 0.2]"}, {}, ConfigError,
     "'data.mean': got [0.5, 0.5, 0.5]; allowed: one value per input channel (model.in_chans=1)"),
    ({"engine.device": "cuda"}, {"CUDA_VISIBLE_DEVICES": ""}, ConfigError, "no CUDA device is visible; use 'auto' or 'cpu'"),
    ({"engine.precision": "fp16", "engine.device": "cpu"}, {}, ConfigError, "'fp16' on the CPU; use 'fp32' or 'bf16' there"),
    ({"data.num_workers": "-1"}, {}, ConfigError, "'data.num_workers': got -1; allowed: an integer >= 0"),
    ({"schedule.warmup_epochs": "3"}, {}, ConfigError,
     "'schedule.warmup_epochs': got 3.0; allowed: a number in [0, schedule.epochs=3)"),
    ({"sparsity.examples.policy": "random"}, {}, ConfigError,
     "'sparsity.examples.policy': got 'random'; allowed: 'none' | 'forgetting' | 'infobatch'"),
    ({"model.name": "deit_tiny_patch16"}, {}, ValueError, "unknown timm model 'deit_tiny_patch16'"),
    ({"model.name": "resnet18"}, {}, ValueError, "'resnet18' is not a plain ViT"),
    ({"resume": "/nonexistent/step_00000004"}, {}, FileNotFoundError, "no such checkpoint (a step_XXXXXXXX folder"),
    ({"data.train_urls": "/nonexistent/train-{000000..000003}.tar"}, {}, FileNotFoundError, "no shard matches data.train_urls"),
    ({"schedule.min_lr": "0.01"}, {}, ConfigError,
     "'schedule.min_lr': got 0.01; allowed: at most the peak learning rate 0.001 (optim.lr, or optim.base_lr x "
     "data.batch_size / 512), or the cosine 'decay' would raise the learning rate"),
    ({"engine.zero_stage": "3"}, {}, ConfigError,
     "'engine.zero_stage': is set but the backend is 'single', which would ignore it; remove engine.zero_stage, or "
     "set engine.backend=deepspeed"),
    ({"engine.deepspeed_config": "launch/deepspeed/zero2_bf16.json", "engine.backend": "ddp"}, TWO_RANKS, ConfigError,
     "'engine.deepspeed_config': is set but the backend is 'ddp'"),
]


@pytest.mark.parametrize("overrides, environment, error, message", CASES)
def test_bad_input_is_refused_with_the_fix(tiny_shards, tmp_path, monkeypatch, overrides, environment, error, message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(error) as raised:
        trainer = Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "run", **overrides)))
        trainer.train()
    assert message in str(raised.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "refused before the first training step"


def test_a_checkpoint_of_another_model_is_refused(tiny_shards, tmp_path):
    Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "a", **{"schedule.max_steps": "4"}))).train()
    other = tiny_overrides(tiny_shards, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / "step_00000004"),
                           **{"model.timm_kwargs": "{embed_dim: 48, depth: 2, num_heads: 2}"})
    with pytest.raises(ValueError, match="other settings that a resume cannot apply \\(model.timm_kwargs"):
        Trainer(load(TrainConfig, None, other)).train()
