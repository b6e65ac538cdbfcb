"""A user's wrong inputs to the command line: each gives one clear message naming the key or file and the fix,
and exit code 2, never a traceback. Run through ``trivit.cli.main`` in this process (the same parsing,
checks and printing as the ``trivit`` command) to keep the table fast."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from trivit.cli import main


@pytest.fixture
def run(capsys):
    def call(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exited:  # argparse's own errors
            code = exited.code
        out, err = capsys.readouterr()
        return code, out, err
    return call


def dry_run(shards, tmp_path, **overrides: str) -> list[str]:
    """``trivit train --dry-run`` on the tiny shards, ``overrides`` last (the last value of a key wins)."""
    return ["train", "--dry-run", *tiny_overrides(shards, tmp_path / "run"), *(f"{k}={v}" for k, v in overrides.items())]


@pytest.mark.parametrize("overrides, message", [
    ({"run_dir": "2024-01-01"}, "config key 'run_dir': YAML reads 2024-01-01 as a date; quote it to keep it a string"),
    ({"optim.eps": "-1"}, "config key 'optim.eps': got -1.0; allowed: a small positive number (e.g. 1e-8)"),
    ({"optim.lr": ".inf"}, "config key 'optim.lr': got inf; allowed: a positive finite number or null"),
    ({"data.mean": "[.nan]"}, "config key 'data.mean': got [nan]; allowed: one finite value per image channel"),
    ({"data.mean": "[0.5, 0.5]", "data.std": "[0.2, 0.2]"},
     "config key 'data.mean': got [0.5, 0.5]; allowed: one finite value per image channel (1 or 3 values)"),
    ({"data.std": "[0.2, 0.2]"}, "config key 'data.std': got [0.2, 0.2]; allowed: as many values as data.mean (1)"),
    ({"data.interpolation": "cubic"}, "config key 'data.interpolation': got 'cubic'; allowed: 'bicubic' | 'bilinear'"),
    ({"data.auto_augment": "bogus"}, "config key 'data.auto_augment': got 'bogus', which timm cannot parse"),
    ({"model.timm_kwargs": "{embed_dim: 30, depth: 2, num_heads: 4}"},
     "refuses these arguments (dim should be divisible by num_heads); check model.timm_kwargs"),
    ({"model.num_classes": "2"}, "config key 'model.num_classes': got 2, fewer than the 4 classes of the shard index"),
    ({"sparsity.examples.policy": "forgetting", "sparsity.examples.initial_remove_fraction": "0.99"},
     "epoch 0 would train on 3 active samples, fewer than one global batch of 16: the example level (policy "
     "'forgetting', initial_remove_fraction 0.99"),
    ({"data.num_workers": "9"}, "8 training shards for 1 data-parallel slots"),
])
def test_bad_values_are_named_with_the_fix(tiny_shards, tmp_path, run, overrides, message):
    code, _, err = run(*dry_run(tiny_shards, tmp_path, **overrides))
    assert code == 2 and message in err and "Traceback" not in err


def test_config_files_that_are_not_yaml_configs(tmp_path, run):
    (tmp_path / "broken.yaml").write_text("model:\n  name: [deit\n")
    (tmp_path / "base3.yaml").write_text("base: 3\n")
    code, _, err = run("train", "--config", str(tmp_path / "broken.yaml"))
    assert code == 2 and f"config file '{tmp_path / 'broken.yaml'}' is not valid YAML at line 3" in err
    code, _, err = run("train", "--config", str(tmp_path / "base3.yaml"))
    assert code == 2 and "config key 'base': in" in err and "got 3; allowed: a config file name or a list" in err
    code, _, err = run("train", "--config", str(tmp_path))
    assert code == 2 and "is a folder; pass --config PATH to a YAML file in it" in err


def test_an_override_after_dry_run_is_an_override(tiny_shards, tmp_path, run):
    code, out, _ = run("train", "--dry-run", *tiny_overrides(tiny_shards, tmp_path / "run"), "schedule.epochs=5")
    assert code == 0 and "5 epochs of up to 16 steps" in out


def test_a_home_relative_shard_path_is_expanded(tiny_shards, tmp_path, run, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_shards.parent))
    home_relative = f"~/{tiny_shards.name}/train-{{000000..000007}}.tar"
    code, out, err = run(*dry_run(tiny_shards, tmp_path, **{"data.train_urls": home_relative}))
    assert code == 0, err
    assert "256 training samples" in out


def test_a_nonfinite_loss_before_any_checkpoint_says_so(tiny_shards, tmp_path, run):
    code, _, err = run("train", *tiny_overrides(tiny_shards, tmp_path / "run", **{
        "optim.lr": "1e12", "optim.clip_grad": "null", "schedule.warmup_epochs": "0", "schedule.max_steps": "3"}))
    assert code == 2 and "no checkpoint was written yet" in err and "is intact" not in err


@pytest.mark.parametrize("argv, message", [
    (["bench", "speed", "--models", "no_such_vit"], "unknown timm model 'no_such_vit' in --models"),
    (["bench", "speed", "--warmup", "-1"], "argument --warmup: -1 is negative"),
    (["bench", "speed", "--steps", "0"], "argument --steps: 0 is not a positive integer"),
    (["shards", "src", "dest", "--samples-per-shard", "0"], "argument --samples-per-shard: 0 is not a positive integer"),
    (["shards", "src", "dest", "--workers", "0"], "argument --workers: 0 is not a positive integer"),
])
def test_bad_command_arguments(argv, message, run):
    code, _, err = run(*argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_bench_writes_a_new_folder_and_never_overwrites_without_the_flag(tmp_path, run, monkeypatch):
    written = []
    monkeypatch.setattr("trivit.engine.workflows.benchmark.bench_speed", lambda *args, out, **kwargs: written.append(out))
    monkeypatch.chdir(tmp_path)
    assert run("bench", "speed", "--models", "deit_tiny_patch16_224")[0] == 0
    assert written[-1].parent == Path("bench-results") and written[-1].name.startswith("speed-")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "speed.md").write_text("committed results")
    code, _, err = run("bench", "speed", "--models", "deit_tiny_patch16_224", "--out", "old")
    assert code == 2 and "old already holds results; pass --overwrite to replace them" in err
    assert run("bench", "speed", "--out", "old", "--overwrite")[0] == 0 and written[-1] == Path("old")
