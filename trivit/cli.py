"""The ``trivit`` command line: ``trivit train --config PATH [key.sub=value ...]``."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from trivit.config import ConfigError, load


def train(args: argparse.Namespace) -> int:
    from trivit.engine.config import TrainConfig
    from trivit.engine.trainer import Trainer

    config = load(TrainConfig, args.config, args.overrides)
    trainer = Trainer(config)
    if args.dry_run:
        print(f"config valid; {trainer.shards.train_samples} training samples, {config.schedule.epochs} epochs "
              f"of up to {trainer.dense_epoch_steps} steps of {config.data.batch_size} images")
        return 0
    last = trainer.train()
    if last:
        print(json.dumps(last))
    else:
        print(f"nothing to train: {config.run_dir} finished at step {trainer.step}; use a new run_dir to train again")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trivit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a ViT from a YAML config")
    train_parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    train_parser.add_argument("--dry-run", action="store_true", help="validate the config and build everything, then stop")
    train_parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    train_parser.set_defaults(run=train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"trivit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
