"""The DeepSpeed config trivit hands to deepspeed.initialize: JSON + inline keys + trivit's values."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from trivit.config import ConfigError, from_dict
from trivit.engine.backends.zero import deepspeed_config, resolve_zero_settings
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World

LAUNCH_JSON = str(Path(__file__).parents[2] / "launch" / "deepspeed" / "zero3_bf16.json")


def config(**engine) -> TrainConfig:
    return from_dict(TrainConfig, {"data": {"batch_size": 64}, "optim": {"clip_grad": 1.0},
                                   "engine": dict(backend="deepspeed", **engine)})


def test_auto_values_are_filled_from_the_run_and_inline_keys_win():
    settings = config(deepspeed_config=LAUNCH_JSON, deepspeed_options={"zero_optimization": {"overlap_comm": False}})
    resolved = resolve_zero_settings(settings)
    assert resolved == {"deepspeed_config": LAUNCH_JSON, "zero_stage": 3, "precision": "bf16"}
    settings = replace(settings, engine=replace(settings.engine, **resolved, grad_accum_steps=2))
    ds = deepspeed_config(settings, World(rank=0, world_size=4))
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["contiguous_gradients"] is True, "the JSON's other keys stay"


def test_an_explicit_value_that_disagrees_is_an_error_naming_both(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 256, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"sets train_batch_size=256 but this run needs 64"):
        deepspeed_config(config(deepspeed_config=str(path), zero_stage=2), World(0, 2))
    with pytest.raises(ConfigError, match=r"engine.deepspeed_options sets zero_optimization.stage=1 but this run needs 3"):
        deepspeed_config(config(zero_stage=3, deepspeed_options={"zero_optimization": {"stage": 1}}), World(0, 2))
