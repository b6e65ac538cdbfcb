"""Config loading and validation: every bad key or value names itself and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from trivit.config import ConfigError, load, parse_overrides
from trivit.engine.config import TrainConfig
from trivit.sparse import create_vit

CONFIGS = Path(__file__).parents[1] / "configs"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "data": {"batch_size": 64}, "optim": {"base_lr": 1e-3}}))
    config = load(TrainConfig, path, ["data.batch_size=32", "model.timm_kwargs={depth: 2}", "optim.betas=[0.9, 0.95]"])
    assert config.seed == 3
    assert config.data.batch_size == 32
    assert config.model.timm_kwargs == {"depth": 2}
    assert config.optim.betas == [0.9, 0.95]
    assert config.optim.peak_lr(config.data.batch_size) == pytest.approx(1e-3 * 32 / 512)


def test_int_is_accepted_for_float_and_null_for_optional():
    config = load(TrainConfig, None, ["optim.lr=1", "optim.clip_grad=null"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.optim.clip_grad is None


@pytest.mark.parametrize("override, message", [
    ("optim.lr_rate=3", "config key 'optim.lr_rate': unknown key (did you mean 'optim.lr'?)"),
    ("schedule.epoch=3", "did you mean 'schedule.epochs'?"),
    ("dat.batch_size=3", "config key 'dat': unknown key (did you mean 'data'?)"),
    ("data.batch_size=big", "config key 'data.batch_size': got 'big' (str); expected int"),
    ("data.batch_size=0", "config key 'data.batch_size': got 0; allowed: a positive integer"),
    ("data.hflip=1.5", "config key 'data.hflip': got 1.5; allowed: a probability in [0, 1]"),
    ("engine.backend=horovod", "config key 'engine.backend': got 'horovod'; allowed: 'auto' | 'single'"),
    ("model.patch_size=16 model.img_size=30",
     "config key 'model.img_size': got 30; allowed: a multiple of model.patch_size (16)"),
    ("schedule.warmup_epochs=400", "config key 'schedule.warmup_epochs': got 400.0"),
    ("checkpoint.keep=0", "config key 'checkpoint.keep': got 0; allowed: a positive integer"),
    ("optim.betas=[0.9]", "config key 'optim.betas'"),
    ("data.mean=[0.5] data.std=[0.2]",
     "config key 'data.mean': got [0.5]; allowed: one value per input channel (model.in_chans=3)"),
    ("logging.every_steps=true", "config key 'logging.every_steps': got True"),
    ("data=3", "config key 'data': expected a mapping"),
    ("seed", "is not of the form key.sub=value"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as error:
        load(TrainConfig, None, override.split(" "))
    assert message in str(error.value)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(TrainConfig, tmp_path / "nope.yaml")


def test_nested_overrides_merge():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


def test_bundled_configs_are_valid():
    from pathlib import Path
    for path in sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml")):  # the studies' too
        load(TrainConfig, path)


def test_exponent_floats_are_numbers_not_strings():
    config = load(TrainConfig, None, ["optim.lr=1e-3", "optim.base_lr=5E-4"])
    assert config.optim.lr == 1e-3 and config.optim.base_lr == 5e-4


def test_base_files_chain_and_override(tmp_path):
    (tmp_path / "root.yaml").write_text("seed: 1\ndata: {batch_size: 64, num_workers: 3}\n")
    (tmp_path / "other.yaml").write_text("data: {num_workers: 4}\n")
    (tmp_path / "mid.yaml").write_text("base: [root.yaml, other.yaml]\ndata: {batch_size: 32}\n")
    (tmp_path / "leaf.yaml").write_text("base: mid.yaml\nseed: 5\n")
    config = load(TrainConfig, tmp_path / "leaf.yaml", ["data.num_workers=1"])
    assert (config.seed, config.data.batch_size, config.data.num_workers) == (5, 32, 1)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="is its own base"):
        load(TrainConfig, tmp_path / "loop.yaml")


@pytest.mark.parametrize("recipe, depth, locations", [("deit_small_trilevel.yaml", 12, {3, 6, 9}),
                                                      ("vit_large_trilevel.yaml", 24, {6, 12, 18})])
def test_the_paper_locations_scale_with_the_depth(recipe, depth, locations):
    config = load(TrainConfig, CONFIGS / recipe)
    with torch.device("meta"):
        model = create_vit(config.model.name, config.sparsity, num_classes=1000)
    assert len(model.blocks) == depth and model.blocks.locations == locations


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_the_semantic_recipes_have_the_papers_layout(size):
    """16 semantic tokens, the STGM at blocks 4-5 of 12 (STViT's DeiT layout)."""
    config = load(TrainConfig, CONFIGS / f"deit_{size}_semantic.yaml")
    with torch.device("meta"):
        model = create_vit(config.model.name, config.sparsity, num_classes=1000)
    assert model.blocks.semantic.roles == {4: "stgm1", 5: "stgm2"} and model.global_centres.shape[:2] == (1, 16)
