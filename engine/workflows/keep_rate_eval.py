"""``trivit eval``: accuracy and inference throughput of a trained model at several keep rates.

EViT's and ToMe's "off-the-shelf" table: token pruning (and attention masking) applied at
evaluation to any model, trained sparse or dense. The architecture comes from the run's
``config.yaml`` (a run_dir or a checkpoint folder inside one) or, for a bare weights file, from
``--model`` and config overrides; the number of classes from the weights' head. Accuracy is the
training runs' own evaluation (``engine/evaluation.py``), split over ranks under a launcher.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trivit.config import ConfigError, load
from trivit.datasets.sources import prepare_source, resolve_val_urls
from trivit.datasets.stream import SampleDecoder
from trivit.datasets.transforms import eval_transform, image_mode
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World, init_process_group
from trivit.engine.evaluation import Evaluator, PlainInputs
from trivit.engine.model.build import create_model, model_arch
from trivit.engine.model.pretrained import find_run_config, load_adapted, read_weights
from trivit.engine.startup import precision_name, resolve_device
from trivit.sparse import set_keep_rates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalRequest:
    source: str
    """A run_dir, a checkpoint folder or a weights file."""
    keep_rates: tuple[float, ...] | None = None
    """Token keep rates; None: 1.0, 0.9, 0.7 and 0.5 (1.0 alone for a semantic-token model)."""
    attention_keep_rates: tuple[float, ...] = (1.0,)
    data: str | None = None
    """Validation shards; None: the run's data.val_urls."""
    model: str | None = None
    """timm model name, for a bare weights file."""
    overrides: tuple[str, ...] = ()
    batch: int | None = None
    """Images per forward pass; None: the run's data.eval_batch_size."""
    repeats: int = 5
    per_class: bool = False
    """Also each class's top-1 (``top1_per_class``)."""


def run_config(request: EvalRequest) -> TrainConfig:
    """The run's config (with ``request.overrides``), or one built from ``--model`` for a bare file."""
    source = Path(request.source).expanduser()
    if request.source != "timm" and not source.exists():
        raise FileNotFoundError(f"trivit eval: {request.source} does not exist; give a run_dir, a checkpoint folder "
                                "or a weights file")
    found = find_run_config(source)
    if found is not None:
        config = load(TrainConfig, found, list(request.overrides))
        if request.model is not None and request.model != config.model.name:
            raise ConfigError("--model", f"got {request.model!r}, but {request.source} is a trivit run of "
                                         f"{config.model.name} (its {found}); --model names the architecture of a "
                                         "bare weights file: drop it")
        return replace(config, model=replace(config.model, init_from=None),
                       distill=replace(config.distill, loss="none", teacher=None))
    if request.model is None:
        raise ConfigError("--model", f"{request.source} is not a trivit run (no config.yaml beside it); name its timm "
                                     "architecture with --model (e.g. deit_small_patch16_224) and its settings as "
                                     "overrides (model.img_size=..., model.timm_kwargs=...)")
    return load(TrainConfig, None, [f"model.name={request.model}", *request.overrides])


def build_model(config: TrainConfig, source: str) -> tuple[nn.Module, str]:
    """The run's model with the source's weights (the number of classes from their head)."""
    model_cfg = config.model
    state, described = read_weights(source, model_cfg.name, model_cfg.timm_kwargs)
    if "head.weight" not in state:
        raise ValueError(f"{source} holds no classifier head ('head.weight'): nothing to evaluate top-1 with")
    model = create_model(config, state["head.weight"].shape[0], model_arch(config, source), drop_path_rate=0.0)
    for change in load_adapted(model, state):
        log.info("trivit eval: %s", change)
    return model.eval(), described


def inference_img_per_s(model: nn.Module, inputs: PlainInputs, images: torch.Tensor, repeats: int) -> float:
    """Images per second of the forward pass alone, the median of ``repeats`` timed passes after two."""
    seconds = []
    with torch.no_grad():
        for index in range(repeats + 2):
            start = time.perf_counter()
            with inputs.autocast():
                model(images)
            if images.is_cuda:
                torch.cuda.synchronize(images.device)
            if index >= 2:
                seconds.append(time.perf_counter() - start)
    return images.shape[0] / statistics.median(seconds)


def token_keep_rates(request: EvalRequest, config: TrainConfig) -> tuple[float, ...]:
    """The token keep rates to evaluate at; a semantic-token model has a fixed token count, no keep rate."""
    if not config.sparsity.semantic.enabled:
        return request.keep_rates or DEFAULT_KEEP_RATES
    if request.keep_rates not in (None, (1.0,)):
        raise ConfigError("--keep-rates", f"got {list(request.keep_rates)}, but {request.source} has semantic tokens "
                                          "(sparsity.semantic), a fixed number of tokens that no keep rate changes; "
                                          "evaluate it at 1.0 (leave --keep-rates out)")
    return (1.0,)


DEFAULT_KEEP_RATES = (1.0, 0.9, 0.7, 0.5)


def evaluate_keep_rates(request: EvalRequest, world: World) -> tuple[list[dict[str, Any]], str]:
    """One row per (attention, token) keep rate: top-1, top-5, loss, img/s and the speed-up over 1.0 / 1.0."""
    config = run_config(request)
    device, amp_dtype = resolve_device(config, world)
    init_process_group(world, device, config.engine.timeout_s)
    val = request.data if request.data is not None else config.data.val_urls
    if not val and not config.data.train_urls:  # a built-in source (data.source): its prepared folder
        val = str(prepare_source(config.data.source, config.data.cache_dir))
    val_urls = resolve_val_urls(val, key="--data")
    if not val_urls:
        raise ConfigError("--data", "no validation shards: the run has no data.val_urls; pass --data with shards "
                                    "or a folder written by 'trivit shards'")
    config = replace(config, data=replace(config.data, eval_batch_size=request.batch or config.data.eval_batch_size))
    request = replace(request, keep_rates=token_keep_rates(request, config))
    if config.model.dcal.enabled and min(request.keep_rates + request.attention_keep_rates) < 1:
        raise ConfigError("--keep-rates", "the run has DCAL (model.dcal), whose rollout needs every token: evaluate it "
                                          "at keep rate 1.0 only (--keep-rates 1.0 --attention 1.0)")
    model, described = build_model(config, request.source)
    model.to(device)
    inputs = PlainInputs(device, amp_dtype)
    size, channels = config.model.img_size, config.model.in_chans
    decoder = SampleDecoder(eval_transform(config.data, size), image_mode(channels), model.num_classes)
    evaluator = Evaluator(config, world, device, val_urls, inputs, decoder)
    images = torch.randn(config.data.eval_batch_size, channels, size, size, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    rows = []
    for attention in request.attention_keep_rates:
        for tokens in request.keep_rates:
            set_keep_rates(model, tokens, attention)
            metrics = evaluator.evaluate(model, per_class=request.per_class)
            rows.append({"keep_rate": tokens, "attention_keep_rate": attention, "top1": metrics.get("eval_top1"),
                         "top5": metrics.get("eval_top5"), "loss": metrics.get("eval_loss"),
                         "samples": metrics["eval_samples"], "skipped": metrics["eval_skipped"],
                         "img_per_s": inference_img_per_s(model, inputs, images, request.repeats),
                         **({"top1_per_class": metrics.get("eval_top1_per_class")} if request.per_class else {})})
            if not metrics["eval_samples"]:
                raise ValueError(f"no readable validation sample in {val}: all {metrics['eval_skipped']} were skipped "
                                 "(the warnings above say why: labels outside the model's classes, unreadable images)")
    dense = next((r["img_per_s"] for r in rows if r["keep_rate"] == r["attention_keep_rate"] == 1.0), None)
    for row in rows:
        row["speedup"] = row["img_per_s"] / dense if dense else None
    skipped = f" ({rows[0]['skipped']} skipped as unreadable, named in the warnings)" if rows and rows[0]["skipped"] else ""
    header = (f"{config.model.name} from {described}; {rows[0]['samples'] if rows else 0} validation images{skipped}; "
              f"throughput: batch {config.data.eval_batch_size}, {precision_name(amp_dtype)}, {device}, "
              f"median of {request.repeats}")
    return rows, header


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| tokens keep rate | attention keep rate | top-1 (%) | top-5 (%) | loss | img/s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"| {r['keep_rate']} | {r['attention_keep_rate']} | {r['top1']:.2f} | {r['top5']:.2f} | "
                     f"{r['loss']:.4f} | {r['img_per_s']:.1f} | {speedup} |")
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], header: str, out: Path) -> None:
    """``out`` (JSON: a list of rows) and beside it a plot of top-1 against throughput (``.png``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    figure, axis = plt.subplots(figsize=(6, 4))
    for attention in dict.fromkeys(r["attention_keep_rate"] for r in rows):
        mine = [r for r in rows if r["attention_keep_rate"] == attention]
        axis.plot([r["img_per_s"] for r in mine], [r["top1"] for r in mine], marker="o",
                  label=f"attention keep {attention}")
        for r in mine:
            axis.annotate(f"{r['keep_rate']}", (r["img_per_s"], r["top1"]), textcoords="offset points", xytext=(4, 4))
    axis.set_xlabel("inference img/s")
    axis.set_ylabel("top-1 (%)")
    axis.set_title(header.split(";")[0], fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)
