"""What a run_dir holds, and when trivit may write into it.

A run_dir belongs to one run: its checkpoints, ``metrics.jsonl``, ``config.yaml`` (the resolved
config, rewritten at each start that trains) and ``model.safetensors``. trivit never writes over what
it cannot account for: a finished model whose checkpoints are gone, or a ``config.yaml`` that it did
not write (a user's own config kept there).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from trivit.config import to_dict
from trivit.engine.config import TrainConfig

CONFIG_FILE = "config.yaml"
CONFIG_HEADER = "# trivit: the resolved config of this run, written at each start that trains; keep your own configs " \
                "outside the run_dir\n"
"""The first line of the config trivit writes: how it tells its own file from a user's."""


def check_fresh_start(run_dir: Path, weights_file: str, metrics_file: str) -> None:
    """Before training from step 0 (no checkpoint): the run_dir holds no earlier run's results."""
    left = [name for name in (weights_file, metrics_file) if (run_dir / name).is_file()]
    if left:
        raise FileExistsError(f"run_dir {str(run_dir)!r} holds an earlier run's {' and '.join(left)} but no checkpoint "
                              "to continue it from (were checkpoints/ deleted?); training from step 0 here would "
                              "replace the model and mix two runs' metrics. Use a new run_dir, or start from that "
                              f"model: model.init_from={run_dir / weights_file}")


def check_config_file(run_dir: Path) -> None:
    """A ``config.yaml`` in the run_dir must be one trivit wrote (it is rewritten at each start)."""
    path = run_dir / CONFIG_FILE
    if path.is_file() and not path.read_text().startswith((CONFIG_HEADER, "run_dir:")):
        raise FileExistsError(f"{path} was not written by trivit, and trivit writes the run's resolved config there; "
                              "move your config outside the run_dir (trivit train --config PATH run_dir=...)")


def write_config(run_dir: Path, config: TrainConfig) -> None:
    """Record the resolved config: what this run does."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(CONFIG_HEADER + yaml.safe_dump(to_dict(config), sort_keys=False))
