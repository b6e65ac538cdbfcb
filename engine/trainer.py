"""The training loop: one checkpointable object that owns model, optimiser, schedules, data position
and sparsity state.

The loop counts steps. An epoch is active-set size // global batch steps (the whole training
set without the example level), decided when the epoch begins; the fractional epoch drives
the LR and keep-rate schedules. The data stream is a pure function of (seed, epoch, batch
index, active set), so a checkpoint's step is its data position and resuming reproduces the
uninterrupted run exactly.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from trivit.config import ConfigError, to_dict
from trivit.datasets.sources import resolve_shards
from trivit.datasets.stream import Batch, SampleDecoder, StreamLayout, eval_loader, train_loader
from trivit.datasets.transforms import batch_mixer, eval_transform, image_mode, train_transform
from trivit.engine.checkpoint import CheckpointManager, load_checkpoint
from trivit.engine.config import TrainConfig
from trivit.engine.epochs import EpochTracker
from trivit.engine.loss import per_sample_cross_entropy, smoothed_targets
from trivit.engine.metrics import MetricsLogger
from trivit.engine.optim import build_optimizer, build_scheduler
from trivit.engine.rng import rng_state, seed_everything, set_rng_state
from trivit.sparse import create_vit, set_keep_rates
from trivit.sparse.examples import EpochPlan, ExampleSelector, sum_across_ranks
from trivit.sparse.flops import dense_fraction
from trivit.sparse.schedule import scheduled_keep_rate

log = logging.getLogger(__name__)


def resolve_device(config: TrainConfig) -> tuple[torch.device, torch.dtype | None]:
    """The device and the autocast dtype (None = fp32) the config asks for on this machine."""
    engine = config.engine
    cuda = torch.cuda.is_available()
    if engine.device == "cuda" and not cuda:
        raise ConfigError("engine.device", "got 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    device = torch.device("cuda" if engine.device == "cuda" or (engine.device == "auto" and cuda) else "cpu")
    precision = engine.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("engine.precision", "got 'fp16' on the CPU; use 'fp32' or 'bf16' there")
    return device, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_backend(config: TrainConfig) -> str:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise ConfigError("engine.backend", f"the launcher started {world_size} processes (WORLD_SIZE), "
                                            "but this trivit runs one process; launch it with plain 'trivit train'")
    return "single"


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; ``resume=auto`` continues it."""


class Trainer:
    """Builds everything from a :class:`TrainConfig` and trains it; ``state_dict`` is the whole run state."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.backend = resolve_backend(config)
        self.device, self.amp_dtype = resolve_device(config)
        seed_everything(config.seed)

        data = config.data
        self.shards = resolve_shards(data)
        num_samples = self.shards.train_samples
        if num_samples < data.batch_size:
            raise ConfigError("data.batch_size", f"got {data.batch_size}, larger than the {num_samples} training samples")
        self.num_classes = config.model.num_classes or len(self.shards.classes)

        self.model = self._build_model(self.num_classes).to(self.device)
        self.optimizer = build_optimizer(self.model, config.optim, data.batch_size)
        self.scheduler = build_scheduler(self.optimizer, config.schedule)
        self.ema = ModelEmaV3(self.model, decay=config.optim.ema_decay) if config.optim.ema_decay else None
        self.mixer = batch_mixer(data, self.num_classes)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        mode = image_mode(config.model.in_chans)
        self.train_decoder = SampleDecoder(train_transform(data, config.model.img_size), mode)
        self.eval_decoder = SampleDecoder(eval_transform(data, config.model.img_size), mode)

        examples = config.sparsity.examples
        self.selector = None
        if examples.policy != "none":
            self.selector = ExampleSelector(examples, num_samples, config.schedule.epochs, config.seed, self.device)
            self.model.blocks.record_cls_attention = examples.policy == "forgetting"
        self.plan = EpochPlan(active=torch.ones(num_samples, dtype=torch.bool), weights=torch.ones(num_samples))
        self.epochs = EpochTracker()
        self.nonfinite_steps = 0
        self.preempted = False
        self.data_counts = {"seen": 0, "skipped": 0, "bad_shards": 0}
        """Training samples read, unreadable samples skipped, unreadable shards (cumulative)."""
        self.step = 0
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", config.checkpoint.keep)

    @property
    def dense_epoch_steps(self) -> int:
        """Steps of an epoch over the whole training set."""
        return self.shards.train_samples // self.config.data.batch_size

    def _build_model(self, num_classes: int) -> nn.Module:
        model_cfg = self.config.model
        args = dict(model_cfg.timm_arguments(), num_classes=num_classes)
        model = create_vit(model_cfg.name, self.config.sparsity, **args)
        patch = model.patch_embed.patch_size[0]
        if model_cfg.img_size % patch:
            raise ConfigError("model.img_size", f"got {model_cfg.img_size}; allowed: a multiple of the "
                                                f"patch size ({patch}) of {model_cfg.name}")
        return model

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model_name": self.config.model.name,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "data": self._data_settings(),
            "epochs": self.epochs.state_dict(),
            "data_counts": dict(self.data_counts),
            "nonfinite_steps": self.nonfinite_steps,
            "plan": {"active": self.plan.active, "weights": self.plan.weights},
            "examples": self.selector.state_dict() if self.selector else None,
        }

    def _data_settings(self) -> dict[str, Any]:
        """What the data position depends on: a checkpoint must match it to resume."""
        return {"train_samples": self.shards.train_samples, "num_workers": self.config.data.num_workers,
                "batch_size": self.config.data.batch_size, "seed": self.config.seed,
                "examples_policy": self.config.sparsity.examples.policy}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        if state["model_name"] != self.config.model.name:
            raise ValueError(f"checkpoint {source} is of model {state['model_name']!r}, this run builds "
                             f"{self.config.model.name!r}; use a new run_dir or resume=never")
        expected = self._data_settings()
        changed = {k: (state["data"][k], v) for k, v in expected.items() if state["data"][k] != v}
        if changed:
            detail = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            raise ValueError(f"checkpoint {source} was written with other data settings ({detail}); the data "
                             "position cannot be carried over: restore those values or start a new run_dir")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ValueError(f"checkpoint {source} does not fit this model: {error}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epochs.load_state_dict(state["epochs"])
        self.data_counts = dict(state["data_counts"])
        self.nonfinite_steps = state["nonfinite_steps"]
        self.plan = EpochPlan(active=state["plan"]["active"], weights=state["plan"]["weights"])
        if self.selector is not None:
            self.selector.load_state_dict(state["examples"])
        self.step = state["step"]

    def _resume(self) -> None:
        resume = self.config.resume
        if resume == "never":
            if self.checkpoints.saved():
                raise ValueError(f"resume=never but {self.checkpoints.folder} already holds checkpoints; "
                                 "use a new run_dir, or resume=auto to continue that run")
            return
        if resume == "auto":
            found = self.checkpoints.load_latest()
            if found is None:
                return
            state, path = found
        else:
            path = Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"resume={resume!r}: no such checkpoint file; use 'auto', 'never' or a path")
            state = load_checkpoint(path)
        self.load_state_dict(state, str(path))
        log.info("resumed from %s at step %d", path, self.step)

    # -- loop --------------------------------------------------------------------------------

    def keep_rates(self, epoch: float) -> tuple[float, float]:
        """(token, attention) keep rates of the sparsity schedule at fractional ``epoch``."""
        sparsity = self.config.sparsity
        start, span = sparsity.schedule.start_epochs, sparsity.schedule.span_epochs
        return (scheduled_keep_rate(epoch, sparsity.tokens.keep_rate, start, span),
                scheduled_keep_rate(epoch, sparsity.attention.keep_rate, start, span))

    def _step_record(self, loss: torch.Tensor, img_per_s: float) -> dict[str, Any]:
        """The metrics of the step just taken (a skipped non-finite loss is logged as null)."""
        loss_value = loss.item()
        blocks = self.model.blocks
        active = int(self.plan.active.sum())
        flops = dense_fraction(self.model)
        return {"step": self.step, "epoch": self.epochs.progress(self.step),
                "loss": loss_value if math.isfinite(loss_value) else None, "nonfinite_steps": self.nonfinite_steps,
                "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": img_per_s,
                "keep_rate_tokens": blocks.token_keep_rate, "keep_rate_attention": blocks.attention_keep_rate,
                "tokens_per_block": list(blocks.tokens_per_block), "active_samples": active,
                "flops_fraction": flops, "epoch_flops_fraction": flops * active / self.shards.train_samples,
                "data/skipped": self.data_counts["skipped"], "data/bad_shards": self.data_counts["bad_shards"]}

    def _count_data(self, batch: Batch) -> None:
        """Add a batch's sample and bad-data counts; too much bad data stops training."""
        counts = self.data_counts
        counts["seen"] += len(batch.ids)
        counts["skipped"] += batch.skipped
        counts["bad_shards"] += batch.bad_shards
        read = counts["seen"] + counts["skipped"]
        limit = self.config.data.max_bad_fraction
        if read >= min(1000, self.shards.train_samples) and counts["skipped"] > limit * read:
            raise ValueError(f"{counts['skipped']} of the {read} training samples read so far are unreadable, more "
                             f"than data.max_bad_fraction={limit}; the warnings above name their shards and keys. "
                             "Repair the shards (trivit shards checks every image) or raise data.max_bad_fraction")

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if self.mixer is not None:
            images, targets = self.mixer(images, labels)
        else:
            targets = smoothed_targets(labels, self.num_classes, self.config.data.label_smoothing)
        self.model.train()
        set_keep_rates(self.model, *self.keep_rates(self.epochs.progress(self.step)))
        with self._autocast():
            logits = self.model(images)
        losses = per_sample_cross_entropy(logits, targets)
        loss = (losses * self.plan.weights[ids].to(self.device)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            self._update(loss)
            if self.selector is not None:
                self.selector.stats.update(ids.to(self.device), logits.detach(), labels,
                                           self.model.blocks.last_cls_attention, losses.detach())
        else:
            self._nonfinite(loss)
        self.scheduler.step(self.epochs.progress(self.step + 1))
        return loss.detach()

    def _update(self, loss: torch.Tensor) -> None:
        """Backward, clip, optimizer step and EMA for a finite loss."""
        self.scaler.scale(loss).backward()
        if self.config.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step + 1)

    def _nonfinite(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf loss, or skip the update and count it (``engine.nonfinite_loss``)."""
        engine = self.config.engine
        where = f"loss is {loss.item()} at step {self.step + 1}; the last checkpoint in {self.checkpoints.folder} is intact"
        if engine.nonfinite_loss == "stop":
            raise FloatingPointError(f"{where} (engine.nonfinite_loss=skip skips such steps instead)")
        self.nonfinite_steps += 1
        log.warning("%s; update skipped (%d so far)", where, self.nonfinite_steps)
        if self.nonfinite_steps > engine.max_nonfinite_steps:
            raise FloatingPointError(f"{where}; {self.nonfinite_steps} steps had non-finite losses, more than "
                                     f"engine.max_nonfinite_steps={engine.max_nonfinite_steps}: lower the learning "
                                     "rate or check the data")

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 accuracy (%) and mean cross-entropy over the whole validation split."""
        data = self.config.data
        loader = eval_loader(self.shards.val_urls, self.eval_decoder, batch_size=data.eval_batch_size,
                             rank=0, world_size=1, num_workers=min(data.num_workers, len(self.shards.val_urls)))
        was_training = model.training
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        skipped = 0
        for batch in loader:
            skipped += batch.skipped
            if not len(batch.ids):
                continue
            images, labels = batch.images.to(self.device), batch.labels.to(self.device)
            with self._autocast():
                logits = model(images).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            total += labels.numel()
        model.train(was_training)
        if total == 0:
            raise ValueError("the validation shards yielded no samples; check data.val_urls")
        return {"eval_top1": 100.0 * correct / total, "eval_loss": loss_sum / total, "eval_skipped": skipped}

    def _evaluate_all(self) -> dict[str, float]:
        """Evaluate the model (and its EMA) at the final keep rates of the schedule."""
        sparsity = self.config.sparsity
        models = {"": self.model, **({"_ema": self.ema.module} if self.ema is not None else {})}
        metrics = {}
        for suffix, model in models.items():
            current = (model.blocks.token_keep_rate, model.blocks.attention_keep_rate)
            set_keep_rates(model, sparsity.tokens.keep_rate, sparsity.attention.keep_rate)
            metrics.update({f"{k}{suffix}": v for k, v in self.evaluate(model).items()})
            set_keep_rates(model, *current)
        return metrics

    def _begin_epoch(self) -> None:
        """Plan the next epoch (its active set, hence its length) and record where it starts."""
        epoch = self.epochs.current + 1
        if self.selector is not None:
            self.plan = self.selector.plan_epoch(epoch, all_reduce=sum_across_ranks)
        self.epochs.begin(self.step, int(self.plan.active.sum()) // self.config.data.batch_size)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """Pre-emption: finish the current step, write a checkpoint, stop (see the training loop)."""
        log.warning("SIGTERM received: stopping after this step with a checkpoint")
        self.preempted = True

    def finished(self) -> bool:
        """All epochs done, or ``schedule.max_steps`` reached."""
        schedule = self.config.schedule
        if schedule.max_steps is not None and self.step >= schedule.max_steps:
            return True
        return self.epochs.epoch_done(self.step) and self.epochs.current + 1 >= schedule.epochs

    def _layout(self, epoch: int) -> StreamLayout:
        return StreamLayout(tuple(self.shards.train_urls), seed=self.config.seed, epoch=epoch, rank=0, world_size=1,
                            num_streams=max(1, self.config.data.num_workers), resampled=self.config.data.resampled)

    def _is_eval_step(self) -> bool:
        every = self.config.schedule.eval_every_steps
        epoch_end = self.epochs.epoch_done(self.step)
        return (self.step % every == 0 if every else epoch_end) or self.finished()

    def _save(self) -> None:
        path = self.checkpoints.save(self.state_dict(), self.step)
        log.info("saved %s", path)

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))

    def train(self) -> dict[str, Any]:
        """Train from the current (or resumed) step to the end; returns the last metrics record."""
        self._resume()
        self._write_config()
        config = self.config
        data = config.data
        metrics = MetricsLogger(self.run_dir, config.logging.tensorboard)
        last: dict[str, Any] = {}
        bar = tqdm(total=self.config.schedule.max_steps or self.config.schedule.epochs * self.dense_epoch_steps,
                   initial=self.step, disable=not config.logging.progress_bar, dynamic_ncols=True, desc="train")
        window_images, window_time = 0, 0.0
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            while not self.finished():
                if self.epochs.epoch_done(self.step):
                    self._begin_epoch()
                offset = self.epochs.offset(self.step)
                stop = self.epochs.lengths[-1]
                if config.schedule.max_steps is not None:
                    stop = min(stop, offset + config.schedule.max_steps - self.step)
                active = self.plan.active.numpy() if self.selector is not None else None
                loader = train_loader(self._layout(self.epochs.current), self.train_decoder,
                                      batch_size=data.batch_size, start=offset, stop=stop,
                                      shuffle_buffer=data.shuffle_buffer, num_workers=data.num_workers, active=active)
                tick = time.perf_counter()
                for batch in loader:
                    self._count_data(batch)
                    loss = self._train_step(batch.images, batch.labels, batch.ids)
                    self.step += 1
                    window_images += len(batch.ids)
                    window_time += time.perf_counter() - tick
                    evaluate = self._is_eval_step()
                    if evaluate or self.step % config.logging.every_steps == 0:
                        record = self._step_record(loss, window_images / max(window_time, 1e-9))
                        if evaluate:
                            record.update(self._evaluate_all())
                        metrics.log(record)
                        last = record
                        window_images, window_time = 0, 0.0
                        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{record['img_per_s']:.0f}",
                                        **({"top1": f"{record['eval_top1']:.2f}"} if evaluate else {}))
                    if self.step % config.checkpoint.every_steps == 0 or self.finished() or self.preempted:
                        self._save()
                    if self.preempted:
                        raise Preempted(f"SIGTERM: checkpoint written at step {self.step} in {self.checkpoints.folder}; "
                                        "run the same command (resume=auto) to continue")
                    bar.update(1)
                    tick = time.perf_counter()
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            bar.close()
            metrics.close()
        return last
