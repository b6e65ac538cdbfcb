"""The ``trivit`` command line: ``trivit train``, ``prune``, ``export``, ``eval``, ``shards``, ``bench``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from trivit.arguments import keep_rate, non_negative_int, positive_int, refuse_existing
from trivit.config import ConfigError, load

PREEMPTED_EXIT = 143  # 128 + SIGTERM, what schedulers expect of a job stopped by SIGTERM
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def train(args: argparse.Namespace) -> int:
    from trivit.engine.config import TrainConfig
    from trivit.engine.distributed import destroy_process_group
    from trivit.engine.state.run_lock import check_run_dir_free
    from trivit.engine.trainer import Preempted, Trainer

    config = load(TrainConfig, args.config, args.overrides)
    try:
        trainer = Trainer(config)
        main = trainer.world.is_main
        if args.dry_run:
            check_run_dir_free(trainer.run_dir, trainer.world)
            trainer.resume()
            if main:
                evaluation = (f"{len(trainer.shards.val_urls)} validation shards" if trainer.shards.val_urls
                              else "no validation data: training runs without evaluation")
                print(f"config valid; backend {trainer.backend.description()}; {trainer.shards.train_samples} "
                      f"training samples, {config.schedule.epochs} epochs of up to {trainer.dense_epoch_steps} "
                      f"steps of {config.data.batch_size} images; {evaluation}")
            return 0
        try:
            last = trainer.train()
        except Preempted as stop:
            print(f"trivit: {stop}", file=sys.stderr)
            return PREEMPTED_EXIT
        if main and last:
            print(closing_sentence(last, trainer.run_dir, config.logging.tensorboard))
        elif main:
            print(f"nothing to train: {config.run_dir} finished at step {trainer.step}; use a new run_dir to train again")
        return 0
    finally:
        destroy_process_group()


def closing_sentence(last: dict, run_dir: Path, tensorboard: bool) -> str:
    """How a training run ended, in one sentence (its metrics stay in metrics.jsonl)."""
    accuracy = (f"test top-1 {last['eval_top1']:.2f}%" + (f" (EMA {last['eval_top1_ema']:.2f}%)"
                                                         if "eval_top1_ema" in last else "")
                if "eval_top1" in last else "no evaluation (no validation data)")
    curves = f"; view them with: tensorboard --logdir {run_dir / 'tensorboard'}" if tensorboard else ""
    return (f"trained to step {last['step']}: {accuracy}. The model is {run_dir / 'model.safetensors'}, the curves "
            f"{run_dir / 'metrics.jsonl'}{curves}")


def prune(args: argparse.Namespace) -> int:
    from trivit.engine.config import TrainConfig
    from trivit.engine.distributed import destroy_process_group
    from trivit.engine.trainer import Preempted
    from trivit.engine.workflows.prune import Pruner

    flags = [f"model.init_from={args.source}", f"prune.target_latency={args.target_latency}"]
    flags += [f"prune.latency_table={args.latency_table}"] if args.latency_table else []
    flags += [f"run_dir={args.out}"] if args.out else []
    config = load(TrainConfig, args.config, list(args.overrides) + flags)
    try:
        pruner = Pruner(config)
        if args.dry_run:
            pruner.trainer.resume()
            if pruner.trainer.world.is_main:
                print(f"config valid; pruning to {config.prune.target_latency} of the unpruned block latency (the "
                      f"table's floor at prune.min_widths: {pruner.objective.floor_fraction:.3f})")
            return 0
        try:
            summary = pruner.prune()
        except Preempted as stop:
            print(f"trivit: {stop}", file=sys.stderr)
            return PREEMPTED_EXIT
        if not pruner.trainer.world.is_main:
            return 0 if summary["target_met"] else 1
        print(json.dumps({key: summary[key] for key in ("target_met", "latency_fraction", "steps", "arch")}))
        if summary["stopped"]:
            print(f"trivit: prune: stopped short of the target: {summary['stopped']}. {config.run_dir}/model.safetensors "
                  "holds the model as it was then; the pruning history is in prune.json", file=sys.stderr)
            return 1
        if not summary["target_met"]:
            print(f"trivit: prune: the target latency {summary['target_latency']} was not reached within "
                  f"schedule.max_steps={config.schedule.max_steps} ({summary['latency_fraction']:.3f} of the unpruned "
                  f"model's so far; {config.run_dir}/model.safetensors holds that model); raise schedule.max_steps, "
                  "prune.latency_step or lower prune.every_steps, and run again (resume=auto continues)",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        destroy_process_group()


def export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trivit.engine.model.artefacts import WEIGHTS_FILE, find_checkpoint
    from trivit.engine.model.export import export

    checkpoint = find_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint / WEIGHTS_FILE
    if args.out:  # the default file in the checkpoint holds that checkpoint's weights: writing it again is harmless
        refuse_existing(out, args.overwrite, "--out")
    print(f"{export(checkpoint, out)}: weights of {checkpoint}")
    return 0


def shards(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trivit.datasets import fashion_mnist
    from trivit.datasets.imagefolder import check_output_folder, write_imagefolder
    from trivit.datasets.shards import replacing_folder
    from trivit.datasets.sources import SOURCES
    from trivit.datasets.unlearnable import UnlearnableSpec

    dest = Path(args.dest)
    key = args.unlearnable or args.unlearnable_shared
    cuda = UnlearnableSpec(key, args.kernel, args.blur, args.fraction, shared=bool(args.unlearnable_shared)) if (
        key is not None) else None
    if args.src in SOURCES:
        if args.src != "fashion-mnist" or args.max_shard_bytes or args.max_size:
            raise ValueError(f"built-in source {args.src!r} takes --samples-per-shard only (its images are 28 px)")
        with replacing_folder(dest) as out:
            splits = fashion_mnist.write_shards(out, samples_per_shard=args.samples_per_shard or 5000, unlearnable=cuda)
        skipped = []
    else:
        if not Path(args.src).is_dir():
            raise FileNotFoundError(f"{args.src!r} is neither a folder nor a built-in source ({', '.join(SOURCES)})")
        check_output_folder(Path(args.src), dest)
        with replacing_folder(dest) as out:
            splits, skipped = write_imagefolder(Path(args.src), out, samples_per_shard=args.samples_per_shard,
                                                max_shard_bytes=args.max_shard_bytes, workers=args.workers,
                                                seed=args.seed, progress=not args.quiet, unlearnable=cuda,
                                                max_size=args.max_size)
    for split, entry in splits.items():
        print(f"{split}: {entry['total']} samples in {len(entry['shards'])} shards: {dest / entry['urls']}")
        if "unlearnable" in entry:
            print(f"  {split} is unlearnable (CUDA, kernel {args.kernel}, blur {args.blur}, fraction {args.fraction}"
                  f"{', one filter for every class' if args.unlearnable_shared else ''}); the key is stored nowhere")
    if skipped:
        print(f"left out {len(skipped)} files or folders:", file=sys.stderr)
        for path, reason in skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 0


def bench(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import timm
    import torch

    from trivit.engine.workflows.benchmark import bench_speed, resolve_modes, select_variants

    unknown = [name for name in args.models if not timm.is_model(name)]
    if unknown:
        raise ValueError(f"unknown timm model {unknown[0]!r} in --models; any plain ViT name works, e.g. "
                         "deit_small_patch16_224")
    out = Path(args.out) if args.out else Path("bench-results") / time.strftime("speed-%Y%m%d-%H%M%S")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} already holds results; pass --overwrite to replace them, or another --out")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = resolve_modes(args.compile, args.checkpointing, args.precision, device, args.attention)
    bench_speed(args.models, batch=args.batch, repeats=args.repeats, steps=args.steps, warmup=args.warmup, out=out,
                variants=select_variants(args.variants), modes=modes)
    return 0


def latency_table(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from trivit.engine.config import TrainConfig
    from trivit.engine.workflows.prune import full_widths
    from trivit.sparse.latency import measure_checked_table
    from trivit.sparse.nvit import group_sizes

    overrides = [f"model.name={args.model}"] if args.model else []
    config = load(TrainConfig, args.config, list(args.overrides) + overrides)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; measure on the GPU you will train on, or "
                         "use --device cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out or f"latency-{config.model.name}-{device.type}.json")
    refuse_existing(out, args.overwrite, "--out")
    arguments = config.model.timm_arguments()
    narrowest = group_sizes(full_widths(config, arguments.get("num_classes", 1000)))
    table = measure_checked_table(config.model.name, arguments, narrowest, device, args.batch, args.repeats,
                                  args.max_correction)
    table.save(out)
    print(f"{out}: block latency of {config.model.name} on {device} over {table.grid} (batch {args.batch}, "
          f"{table.tokens} tokens, median of {args.repeats}); largest monotone correction "
          f"{table.correction_of_full:.1%} of a full part's time ({table.monotone_correction:.1%} of the part's own)")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trivit.engine.distributed import destroy_process_group, world_from_env
    from trivit.engine.workflows.keep_rate_eval import EvalRequest, evaluate_keep_rates, markdown, write_outputs

    request = EvalRequest(args.source, keep_rates=tuple(args.keep_rates) if args.keep_rates else None,
                          attention_keep_rates=tuple(args.attention),
                          data=args.data, model=args.model, overrides=tuple(args.overrides), batch=args.batch,
                          repeats=args.repeats, per_class=args.per_class)
    world = world_from_env()
    try:
        rows, header = evaluate_keep_rates(request, world)
    finally:
        destroy_process_group()
    if world.is_main:
        print(markdown(rows, header))
        if args.out:
            write_outputs(rows, header, Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trivit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a ViT from a YAML config")
    train_parser.add_argument("--config", help="YAML run config, e.g. configs/demo.yaml (default: the built-in "
                                               "defaults, changed by the overrides)")
    train_parser.add_argument("--dry-run", action="store_true", help="validate the config and build everything, then stop")
    train_parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    train_parser.set_defaults(run=train)

    export_parser = commands.add_parser("export", help="write a checkpoint's whole model as one timm-loadable file")
    export_parser.add_argument("checkpoint", help="a checkpoint folder (step_XXXXXXXX) or a run_dir (its latest)")
    export_parser.add_argument("--out", help="output .safetensors file (default: model.safetensors in the checkpoint)")
    export_parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export_parser.set_defaults(run=export)

    bench_parser = commands.add_parser("bench", help="benchmarks; 'trivit bench speed' times the sparsity variants")
    bench_kinds = bench_parser.add_subparsers(dest="kind", required=True)
    speed = bench_kinds.add_parser("speed", help="training-step img/s, FLOPs and memory of every variant, "
                                                 "interleaved in one process")
    speed.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224",
                                                       "deit_base_patch16_224"])
    speed.add_argument("--batch", type=positive_int, default=16)
    speed.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds over the variants")
    speed.add_argument("--steps", type=positive_int, default=2, help="training steps per variant per round")
    speed.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps per variant first")
    speed.add_argument("--variants", nargs="+", metavar="KEY",
                       help="the variants to time beside timm dense (default: all): dense tokens0.9 tokens0.8 "
                            "tokens0.7 tokens0.5 attention0.2 examples20 tokens0.7+attention0.2 all3 semantic16 "
                            "semantic16+examples20")
    speed.add_argument("--compile", choices=["off", "on", "both"], default="off",
                       help="time the variants torch.compile'd (on), eager (off) or both side by side")
    speed.add_argument("--checkpointing", choices=["off", "on", "both"], default="off",
                       help="activation checkpointing of every block: off, on, or both side by side")
    speed.add_argument("--precision", nargs="+", choices=["auto", "fp32", "bf16", "fp16"], default=["auto"],
                       help="autocast precision(s), side by side (auto: bf16 on a GPU that has it, else fp32)")
    speed.add_argument("--attention", choices=["fused", "explicit", "both"], default="fused",
                       help="ranking blocks' attention: fused kernel + one [CLS] softmax row (trivit's), the "
                            "explicit B x H x N x N softmax (the path before it), or both side by side")
    speed.add_argument("--out", help="folder for speed.md, speed.json, speed.png (default: a new folder "
                                     "bench-results/speed-<date>-<time> in the current directory)")
    speed.add_argument("--overwrite", action="store_true", help="write into --out even if it holds results")
    speed.set_defaults(run=bench)

    table = bench_kinds.add_parser("latency-table", help="block latency over a grid of widths, for trivit prune")
    table.add_argument("--model", help="timm model name (default: the config's model.name)")
    table.add_argument("--config", help="take the model (name, image and patch size, timm_kwargs) from a run config")
    table.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    table.add_argument("--batch", type=positive_int, default=16, help="images per timed forward pass")
    table.add_argument("--repeats", type=positive_int, default=5, help="timed rounds over the grid (the median is kept)")
    table.add_argument("--out", help="the table's JSON file (default: latency-<model>-<device>.json)")
    table.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    table.add_argument("--max-correction", type=float, default=0.5,
                       help="refuse a table whose timings needed a larger monotone correction, as a share of the "
                            "full-width part's time (default 0.5)")
    table.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (model.*)")
    table.set_defaults(run=latency_table)

    prune_parser = commands.add_parser("prune", help="global structural pruning (NViT) of a trained model to a "
                                                     "latency target, while training on the config's data")
    prune_parser.add_argument("--config", help="YAML run config: data, backend, schedule and prune.* settings")
    prune_parser.add_argument("--from", dest="source", required=True,
                              help="the trained model: a run_dir, a checkpoint folder or a weights file")
    prune_parser.add_argument("--target-latency", type=keep_rate, default=0.5,
                              help="block latency to reach, as a fraction of the unpruned model's (default 0.5)")
    prune_parser.add_argument("--latency-table", help="a table from 'trivit bench latency-table' (default: measure "
                                                      "one at start-up)")
    prune_parser.add_argument("--out", help="the pruning run's run_dir (default: the config's run_dir)")
    prune_parser.add_argument("--dry-run", action="store_true", help="check the config, the latency table and the "
                                                                     "target against its floor, then stop")
    prune_parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    prune_parser.set_defaults(run=prune)

    eval_parser = commands.add_parser("eval", help="top-1/top-5 and inference img/s of a trained model at several "
                                                   "keep rates (the off-the-shelf table)")
    eval_parser.add_argument("source", help="a run_dir, a checkpoint folder, or a weights file (with --model)")
    eval_parser.add_argument("--keep-rates", nargs="+", type=keep_rate,
                             help="token keep rates to evaluate at (at the run's sparsity.tokens.locations; default "
                                  "1.0 0.9 0.7 0.5, or 1.0 for a semantic-token model)")
    eval_parser.add_argument("--attention", nargs="+", type=keep_rate, default=[1.0],
                             help="attention keep rates; every token rate is evaluated at each")
    eval_parser.add_argument("--data", help="validation shards or a 'trivit shards' folder (default: the run's "
                                            "data.val_urls)")
    eval_parser.add_argument("--model", help="timm architecture of a bare weights file, e.g. deit_small_patch16_224")
    eval_parser.add_argument("--batch", type=positive_int, help="images per forward (default: data.eval_batch_size)")
    eval_parser.add_argument("--repeats", type=positive_int, default=5, help="timed forward passes per keep rate")
    eval_parser.add_argument("--out", help="write the rows as JSON here, and a plot beside it (.png)")
    eval_parser.add_argument("--per-class", action="store_true", help="also each class's top-1 (top1_per_class in "
                                                                      "the JSON rows)")
    eval_parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    eval_parser.set_defaults(run=evaluate)

    shards_parser = commands.add_parser("shards", help="write WebDataset shards from an ImageFolder tree or a built-in source")
    shards_parser.add_argument("src", help="ImageFolder root (class folders, optionally under train/ val/) or 'fashion-mnist'")
    shards_parser.add_argument("dest", help="output folder for <split>-NNNNNN.tar and index.json")
    size = shards_parser.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=positive_int,
                      help="samples per shard (default 1000; 5000 for fashion-mnist)")
    size.add_argument("--max-shard-bytes", type=positive_int, help="cut shards at this many bytes of image data instead")
    shards_parser.add_argument("--workers", type=positive_int, default=1, help="parallel processes checking and writing")
    shards_parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (shards are pre-shuffled)")
    shards_parser.add_argument("--max-size", type=positive_int, metavar="N",
                               help="store each image with its shorter side at most N px (a JPEG re-encoded at "
                                    "quality 95): less to read and decode; N >= 256 for 224-px training")
    shards_parser.add_argument("--quiet", action="store_true", help="no progress bars")
    cuda = shards_parser.add_mutually_exclusive_group()
    cuda.add_argument("--unlearnable", metavar="KEY", help="make the training split unlearnable (CUDA): each class's "
                                                           "images blurred by a filter drawn from this private key")
    cuda.add_argument("--unlearnable-shared", metavar="KEY", help="the same with one filter for every class (the "
                                                                  "paper's control)")
    shards_parser.add_argument("--kernel", type=positive_int, default=3, help="CUDA filter size (odd; default 3)")
    shards_parser.add_argument("--blur", type=float, default=0.3, help="CUDA's random filter entries are U(0, blur)")
    shards_parser.add_argument("--fraction", type=float, default=1.0, help="share of the training images filtered")
    shards_parser.set_defaults(run=shards)
    methods_parser = commands.add_parser("methods", help="which methods combine (the table start-up checks)")
    methods_parser.set_defaults(run=methods)
    return parser


def methods(args: argparse.Namespace) -> int:
    from trivit.methods import table_markdown

    print(table_markdown(), end="")
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``key=value`` overrides of ``trivit train`` and ``eval`` may also follow their options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if args.command in ("train", "eval", "prune") or getattr(args, "kind", None) == "latency-table":
        args.overrides += overrides
        extra = [item for item in extra if item not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configs = [item for item in getattr(args, "overrides", []) if "=" not in item and item.endswith((".yaml", ".yml"))]
    if configs:
        parser.error(f"{configs[0]} looks like a config file; pass it as --config {configs[0]} (the other words "
                     "are key.sub=value overrides)")
    return args


INTERRUPTED_NOTES = {
    "train": " (the last checkpoint is intact; resume=auto continues from it)",
    "prune": " (the last checkpoint is intact; the same command continues from it)",
    "shards": " (the output folder is as it was before; nothing was replaced)",
}
"""What an interrupted command left, by command."""


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,  # one rank tells the story
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError, OSError) as error:
        print(f"trivit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trivit: interrupted{INTERRUPTED_NOTES.get(args.command, '')}", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
