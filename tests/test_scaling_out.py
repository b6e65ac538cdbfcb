"""Every command of the README's "Scaling out" section and every recipe, started as its launcher starts it.

A cluster cannot run here, so each command's start-up runs in this process under the environment
its launcher would give rank 0: accelerate's own argument handling and environment preparation
for the YAMLs, the variables torchrun, DeepSpeed's launcher and srun set for the others. trivit
then resolves the run (``resolve_run``: backend, precision, ZeRO stage, batch and shard checks)
on small local shards standing in for ImageNet. The recipes themselves run ``--dry-run`` in one
process.
"""
from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

import pytest
import torch

from tests.conftest import synthetic_samples
from trivit.cli import main
from trivit.config import load
from trivit.datasets.shards import write_index, write_split
from trivit.engine import backends
from trivit.engine.config import TrainConfig
from trivit.engine.startup import resolve_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/vit_base_trilevel.yaml"
NODE0 = "10.0.0.1"


@pytest.fixture(scope="module")
def imagenet_stand_in(tmp_path_factory) -> Path:
    """Enough shards for 32 GPUs x 8 workers (256 train, 40 val), read through the folder's index."""
    folder = tmp_path_factory.mktemp("imagenet")
    splits = {"train": write_split(synthetic_samples(256 * 8), folder, "train", 8),
              "val": write_split(synthetic_samples(40 * 2, seed=1), folder, "val", 2)}
    write_index(folder, splits, [f"n{i:08d}" for i in range(1000)])
    return folder


def accelerate_env(argv: list[str], local_rank: int = 0) -> tuple[dict[str, str], list[str]]:
    """The environment ``accelerate launch ARGV`` gives a rank (accelerate's own code), and trivit's arguments."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
    )

    logging.disable(logging.WARNING)
    try:
        args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
        if args.use_deepspeed:
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config) if defaults else ""
            _, env = prepare_deepspeed_cmd_env(args)
        else:
            env = prepare_multi_gpu_env(args)
    finally:
        logging.disable(logging.NOTSET)
    per_node = args.num_processes // args.num_machines
    env.update(RANK=str(args.machine_rank * per_node + local_rank), LOCAL_RANK=str(local_rank),
               WORLD_SIZE=str(args.num_processes), MASTER_ADDR=args.main_process_ip or "127.0.0.1",
               MASTER_PORT=str(args.main_process_port or 29500))
    return env, args.training_script_args


def launched_env(nodes: int, node_rank: int = 0) -> dict[str, str]:
    """What torchrun (and DeepSpeed's launcher, which runs torch's launch) sets for a node's first rank."""
    return {"RANK": str(node_rank * 8), "LOCAL_RANK": "0", "WORLD_SIZE": str(nodes * 8), "MASTER_ADDR": NODE0,
            "MASTER_PORT": "29500"}


def trivit_args(command: str) -> tuple[str, list[str]]:
    """The launcher part of a README command and trivit's ``train`` arguments."""
    words = shlex.split(command.replace("$CONFIG", CONFIG))
    return words[0], words[words.index("train") + 1:]


COMMANDS = [
    # (README command, environment of rank 0, expected backend, precision, ZeRO stage, world size)
    ("accelerate launch --config_file launch/accelerate/ddp.yaml -m trivit train --config $CONFIG",
     None, "ddp", torch.bfloat16, None, 8),
    ("accelerate launch --config_file launch/accelerate/fsdp.yaml -m trivit train --config $CONFIG optim.ema_decay=null",
     None, "fsdp", torch.bfloat16, None, 8),
    ("accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml -m trivit train --config $CONFIG",
     None, "deepspeed", torch.bfloat16, 2, 8),
    ("accelerate launch --config_file launch/accelerate/deepspeed_zero3.yaml -m trivit train --config $CONFIG "
     "optim.ema_decay=null", None, "deepspeed", torch.bfloat16, 3, 8),
    ("deepspeed --num_gpus 8 --no_local_rank --module trivit train --config $CONFIG engine.backend=deepspeed "
     "engine.deepspeed_config=launch/deepspeed/zero2_bf16.json", launched_env(1), "deepspeed", torch.bfloat16, 2, 8),
    ("torchrun --nproc-per-node 8 --max-restarts 3 -m trivit train --config $CONFIG engine.backend=fsdp optim.ema_decay=null",
     launched_env(1), "fsdp", None, None, 8),
    ("accelerate launch --config_file launch/accelerate/multi_node.yaml --machine_rank 2 --main_process_ip 10.0.0.1 "
     "-m trivit train --config $CONFIG", None, "ddp", torch.bfloat16, None, 32),
    ("deepspeed --hostfile launch/hostfile --master_addr 10.0.0.1 --no_local_rank --module trivit train --config "
     "$CONFIG engine.backend=deepspeed engine.deepspeed_config=launch/deepspeed/zero3_bf16.json optim.ema_decay=null",
     launched_env(4, 3), "deepspeed", torch.bfloat16, 3, 32),
    ("torchrun --nnodes 4 --nproc-per-node 8 --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29500 --rdzv-id exp1 "
     "-m trivit train --config $CONFIG engine.backend=ddp", launched_env(4, 1), "ddp", None, None, 32),
    ("srun --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 python -m trivit train --config $CONFIG",
     {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "32", "SLURM_JOB_ID": "5",
      "SLURM_STEP_NODELIST": "gpu[017-020]"}, "ddp", None, None, 32),
]


def test_the_readme_lists_exactly_these_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Scaling out"):readme.index("## The three sparsity levels")]
    listed = [" ".join(line.rstrip("\\").strip() for line in block.splitlines()).replace("$NODE_RANK", "2")
              for block in _command_blocks(section)]
    tested = [command for command, *_ in COMMANDS]
    assert [c for c in listed if not c.startswith("sbatch")] == tested
    assert "sbatch --nodes=4 launch/slurm/train.sbatch $CONFIG" in listed  # tests/test_slurm_script.py


def _command_blocks(section: str) -> list[str]:
    """The commands of the section's bash blocks, continuation lines joined, comments dropped."""
    commands, current = [], []
    for block in section.split("```bash")[1:]:
        for line in block.split("```")[0].splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            current.append(line)
            if not line.rstrip().endswith("\\"):
                commands.append("\n".join(current).replace("DS_ENV_FILE=launch/deepspeed_env ", ""))
                current = []
    return commands


@pytest.mark.parametrize("command, environment, backend, precision, stage, world", COMMANDS,
                         ids=[c.split(" -m ")[0].split(" --module ")[0][:60] for c, *_ in COMMANDS])
def test_each_command_starts(command, environment, backend, precision, stage, world, imagenet_stand_in,
                             monkeypatch, tmp_path):
    launcher, args = trivit_args(command)
    if launcher == "accelerate":
        environment, args = accelerate_env(shlex.split(command.replace("$CONFIG", CONFIG))[2:])
        args = args[1:]  # after "train"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE", "RANK", "LOCAL_RANK", "WORLD",
                                                                       "MASTER", "SLURM", "FSDP"))}
    monkeypatch.setattr(os, "environ", {**clean, **environment})
    monkeypatch.chdir(ROOT)
    config_path, overrides = args[1], args[2:]
    config = load(TrainConfig, config_path, [*overrides, f"data.train_urls={imagenet_stand_in}",
                                             f"data.val_urls={imagenet_stand_in}", f"run_dir={tmp_path}"])
    setup = resolve_run(config)
    engine = setup.config.engine
    assert (engine.backend, setup.amp_dtype, engine.zero_stage, setup.world.world_size) == \
        (backend, precision, stage, world)
    assert setup.micro_batch * world == config.data.batch_size and len(setup.shards.train_urls) == 256
    assert backends.launcher_backend() in (None, backend)


RECIPES = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_passes_dry_run(recipe, imagenet_stand_in, tmp_path, capsys):
    start = ["model.init_from=null"] if recipe == "demo_finetune.yaml" else []  # its source is a `make demo` run
    code = main(["train", "--config", str(ROOT / "configs" / recipe), "--dry-run",
                 f"data.train_urls={imagenet_stand_in}", f"data.val_urls={imagenet_stand_in}", f"run_dir={tmp_path}",
                 "data.num_workers=1", *start])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "config valid; backend single on 1 process(es)" in out and "2048 training samples" in out


def test_the_deepspeed_env_file_is_read_as_deepspeeds_launcher_reads_it():
    """DeepSpeed's runner splits every line of the file at its first '=' (no comments, no blank lines)."""
    lines = (ROOT / "launch" / "deepspeed_env").read_text().splitlines()
    exports = dict(line.split("=", maxsplit=1) for line in lines)
    assert len(exports) == len(lines) and {"PATH", "OMP_NUM_THREADS"} <= exports.keys()
