"""The training loop: one checkpointable object that owns model, optimiser, schedules, data position
and sparsity state.

The loop counts steps. An epoch is active-set size // global batch steps (the whole training
set without the example level), decided when the epoch begins; the fractional epoch drives
the LR and keep-rate schedules. The data stream is a pure function of (seed, epoch, batch
index, active set), so a checkpoint's step is its data position and resuming reproduces the
uninterrupted run exactly.

The same loop runs on every backend (engine/backends/): each rank reads its slots of the
global batch, and every decision that must agree across ranks (skip a non-finite step, stop
on SIGTERM or on bad data, the example level's active set) is taken on all-reduced values.
"""
from __future__ import annotations

import logging
import math
import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trivit.config import to_dict
from trivit.datasets.loaders import DataWaitStopped
from trivit.datasets.stream import Batch, SampleDecoder
from trivit.datasets.transforms import batch_mixer, eval_transform, image_mode
from trivit.engine.backends import build_backend
from trivit.engine.compile import CompileWatch
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import gather_objects, init_process_group
from trivit.engine.ema import build_ema
from trivit.engine.epochs import EpochTracker
from trivit.engine.evaluation import Evaluator
from trivit.engine.metrics import METRICS_FILE, MetricsLogger, Throughput
from trivit.engine.model.artefacts import WEIGHTS_FILE
from trivit.engine.model.build import ModelBuilder, arch_record, build_run_model
from trivit.engine.model.export import export
from trivit.engine.objectives.base import Objective, prediction, split_heads
from trivit.engine.objectives.factory import build_objective
from trivit.engine.objectives.losses import per_sample_cross_entropy, smoothed_targets
from trivit.engine.optim import build_optimizer, build_scheduler, peak_group_lr
from trivit.engine.planner import build_planner
from trivit.engine.startup import check_epoch_length, resolve_run
from trivit.engine.state.checkpoint import CheckpointManager, agreed_resume, check_compatible, pick_checkpoint
from trivit.engine.state.resume_check import check_resumed_settings
from trivit.engine.state.rng import rng_state, seed_everything, set_rng_state
from trivit.engine.state.run_dir import check_config_file, check_fresh_start, write_config
from trivit.engine.state.run_lock import lock_run_dir
from trivit.engine.step_guard import StepGuard
from trivit.engine.train_data import TrainData
from trivit.sparse import set_keep_rates
from trivit.sparse.flops import dense_fraction
from trivit.sparse.schedule import keep_rates_at

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; ``resume=auto`` continues it."""


class Trainer:
    """Builds everything from a :class:`TrainConfig` and trains it; ``state_dict`` is the whole run state."""

    def __init__(self, config: TrainConfig, build_model: ModelBuilder | None = None):
        """``build_model``: what builds the model and its starting weights (default :func:`build_run_model`);
        a workflow (engine/workflows/) gives its own, and its own objective through :meth:`use_objective`."""
        setup = resolve_run(config)
        self.setup = setup
        self.config = config = setup.config
        self.world, self.device, self.amp_dtype = setup.world, setup.device, setup.amp_dtype
        self.micro_batch, self.shards, self.num_classes = setup.micro_batch, setup.shards, setup.num_classes
        self.run_dir = Path(config.run_dir)
        data = config.data
        init_process_group(self.world, self.device, config.engine.timeout_s)

        self.init_record: dict[str, Any] = {}
        """What ``model.init_from`` loaded from where (logged as the run's step-0 line)."""
        seed_everything(config.seed)  # the same initial weights on every rank
        self.backend = build_backend(config, self.world, self.device, self.amp_dtype)
        model, self.init_record = (build_model or build_run_model)(config, self.num_classes)
        self.backend.setup(model.to(self.device), lambda module: build_optimizer(module, config.optim, data.batch_size))
        self.model = self.backend.module
        self.optimizer = self.backend.optimizer
        self.scheduler = build_scheduler(self.optimizer, config.schedule)
        self.ema = build_ema(self.model, config.optim.ema_decay) if config.optim.ema_decay else None
        self.objective = build_objective(config, self.model, self.num_classes, self.device, self.amp_dtype)
        seed_everything(config.seed + self.world.rank)  # each rank its own dropout, drop-path and mixup draws
        self.mixer = batch_mixer(data, self.num_classes)
        self.data = TrainData(setup, lambda: self.guard.stop_requested)
        eval_decoder = SampleDecoder(eval_transform(data, config.model.img_size), image_mode(config.model.in_chans),
                                     self.num_classes)
        self.evaluator = Evaluator(config, self.world, self.device, self.shards.val_urls, self.backend, eval_decoder)
        self.compile_watch = CompileWatch(config.engine.compile, config.sparsity.schedule.levels,  # before compiling
                                          len(self.model.blocks.locations), self.evaluator.batch_shapes(),
                                          1 + (self.ema is not None))

        self.planner = build_planner(config.sparsity.examples, self.shards.num_ids, self.shards.train_samples,
                                     config.schedule.epochs, config.seed, self.device)
        self.use_objective(self.objective)
        self.epochs = EpochTracker()
        self.step = 0
        self.throughput = Throughput()
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", config.checkpoint.keep,
                                             self.world.is_main, self.device)
        self.guard = StepGuard(config, self.shards.train_samples, self.world.world_size, self.device,
                               self.checkpoints.saved)

    @property
    def dense_epoch_steps(self) -> int:
        """Steps of an epoch over the whole training set."""
        return self.shards.train_samples // self.config.data.batch_size

    def use_objective(self, objective: Objective) -> None:
        """Train ``objective``: its loss, what it asks of the forward pass, its hook on the reduced gradients."""
        self.objective = objective
        self.taps = self.planner.taps.merged(objective.taps)
        """What the step's forward hands back beside the outputs (sparse/taps.py)."""
        self.backend.gradient_hook = objective.gradient_hook

    # -- state -------------------------------------------------------------------------------

    def state_dict(self, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
        """The main rank's ``trainer.pt``, less what the backend adds (model and optimizer)."""
        return {
            "step": self.step,
            "backend": self.backend.name,
            "model_name": self.config.model.name,
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "ranks": rank_states,
            "data": self.data.settings(),
            "epochs": self.epochs.state_dict(),
            **self.guard.state_dict(),
            **self.planner.state_dict(),
            "objective": self.objective.state_dict(),
            "arch": arch_record(self.model),
            "train_seconds": self.throughput.total_seconds,
            "config": to_dict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        self.data.adopt(state["data"])
        check_compatible(state, source, self.config.model.name, self.backend.name, self.data.settings())
        check_resumed_settings(state.get("config"), self.config, source)
        try:
            self.backend.load(source, state)
        except RuntimeError as error:
            raise ValueError(f"checkpoint {source} does not fit this model: {error}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        elif self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())
            log.info("optim.ema_decay is new in this run: the EMA starts from the resumed weights")
        rank_state = state["ranks"][self.world.rank]
        set_rng_state(rank_state["rng"])
        self.epochs.load_state_dict(state["epochs"])
        self.guard.load_state_dict(state)
        self.planner.load_state_dict(state)
        self.objective.load_state_dict(state.get("objective"))
        self.step = state["step"]
        self.throughput.total_seconds = state.get("train_seconds", 0.0)
        self.data.restore(rank_state, self.epochs.current, self.epochs.offset(self.step))

    def resume(self) -> None:
        """Load the checkpoint ``resume`` asks for, after every check a start makes (``--dry-run`` calls it too)."""
        check_config_file(self.run_dir)
        found = agreed_resume(lambda: pick_checkpoint(self.config.resume, self.checkpoints), self.world.is_main)
        if found is None:
            check_fresh_start(self.run_dir, WEIGHTS_FILE, METRICS_FILE)
            return
        self.load_state_dict(*found)
        log.info("resumed from %s at step %d", found[1], self.step)
        if self.config.model.init_from:
            log.info("model.init_from is not used: the resumed checkpoint's weights replace it")

    # -- loop --------------------------------------------------------------------------------

    def _step_record(self, loss: torch.Tensor, img_per_s: float) -> dict[str, Any]:
        """The metrics of the step just taken (a skipped non-finite loss is logged as null)."""
        loss_value = loss.item()
        blocks = self.model.blocks
        active = self.planner.active_samples
        flops = dense_fraction(self.model)
        return {"step": self.step, "epoch": self.epochs.progress(self.step),
                "loss": loss_value if math.isfinite(loss_value) else None, "nonfinite_steps": self.guard.nonfinite_steps,
                "lr": peak_group_lr(self.optimizer), "img_per_s": img_per_s,
                "train_s": self.throughput.total_seconds,
                "keep_rate_tokens": blocks.token_keep_rate, "keep_rate_attention": blocks.attention_keep_rate,
                "tokens_per_block": list(blocks.tokens_per_block),
                "attention_density": {str(block): d.item() for block, d in blocks.attention_density.items()},
                "active_samples": active,
                "flops_fraction": flops, "epoch_flops_fraction": flops * active / self.shards.train_samples,
                "data/skipped": self.guard.data_counts["skipped"],
                "data/bad_shards": self.guard.data_counts["bad_shards"],
                **self.compile_watch.metrics(),
                **self.objective.metrics()}

    def _train_step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on this rank's batch, micro-batch by micro-batch; returns the global mean loss.

        Nothing here waits for the device (see engine/step_guard.py), except ``engine.nonfinite_loss=skip``."""
        backend, accum = self.backend, self.config.engine.grad_accum_steps
        backend.model.train()
        set_keep_rates(self.model, *keep_rates_at(self.config.sparsity, self.epochs.progress(self.step),
                                                  self.config.schedule.epochs))
        backend.zero_grad()
        rank_batch = len(batch.ids)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        parts = zip(self.data.images(batch).chunk(accum), batch.labels.chunk(accum), batch.ids.chunk(accum))
        for index, (images, labels, ids) in enumerate(parts):
            device_ids = ids.to(self.device, non_blocking=True)
            loss, logits, losses, labels, tapped = self._micro_batch_loss(images, labels, ids, device_ids, rank_batch)
            counts = (len(batch.ids), batch.skipped, batch.bad_shards) if index == 0 else None
            step_loss = self.guard.share(loss, counts)
            if not self.guard.deferred and not self.guard.finite_now(step_loss, self.step + 1):
                backend.zero_grad()
                self.objective.zero_grad()
                total = step_loss  # logged as null; the update is skipped
                break
            backend.backward(loss, last_micro_batch=index == accum - 1)
            self.objective.backward()
            self.planner.observe(device_ids, logits, labels, tapped, losses)
            total += step_loss
        else:
            backend.step()
            self.objective.step(peak_group_lr(self.optimizer))
            if self.ema is not None:
                self.ema.update(self.model, step=self.step + 1)
        self.scheduler.step(self.epochs.progress(self.step + 1))
        return total

    def _micro_batch_loss(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                          device_ids: torch.Tensor, rank_batch: int):
        """Forward one micro-batch (``images`` normalised on the device): its share of the rank's mean weighted loss,
        logits, per-sample losses, labels, and what the forward handed back (:attr:`taps`)."""
        images, labels = self.backend.prepare_inputs(images), labels.to(self.device, non_blocking=True)
        if self.mixer is not None:
            images, targets = self.mixer(images, labels)
        else:
            targets = smoothed_targets(labels, self.num_classes, self.config.data.label_smoothing)
        with self.backend.autocast():
            outputs, tapped = self.backend.model(images, **self.objective.model_inputs(ids, self.step), taps=self.taps)
        class_logits, distillation_logits = split_heads(outputs)
        losses = per_sample_cross_entropy(class_logits, targets)  # the student's own: what the example level scores
        weights = self.planner.weights(device_ids) / rank_batch
        loss = self.objective.loss(losses, outputs, images, targets, weights, tapped)
        return loss, prediction(class_logits, distillation_logits), losses, labels, tapped

    def _begin_epoch(self) -> None:
        """Plan the next epoch (its active set, hence its length) and record where it starts."""
        epoch = self.epochs.current + 1
        self.planner.plan_epoch(epoch)
        active = self.planner.active_samples
        check_epoch_length(self.config, active, epoch)
        left = self.config.schedule.epochs - epoch
        share = left if 0 < left < 1 else 1.0  # a fractional last epoch: its first batches
        self.epochs.begin(self.step, max(1, round(share * (active // self.config.data.batch_size))), share)
        self.data.begin_epoch(epoch)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """Pre-emption: finish the current step, write a checkpoint, stop (see the training loop)."""
        log.warning("SIGTERM received: stopping after this step with a checkpoint")
        self.guard.stop_requested = True

    def finished(self) -> bool:
        """All epochs done, ``schedule.max_steps`` reached, or the objective's end (a pruning run's target)."""
        schedule = self.config.schedule
        if (schedule.max_steps is not None and self.step >= schedule.max_steps) or self.objective.finished():
            return True
        return (self.objective.ends_with_the_epochs and self.epochs.epoch_done(self.step)
                and self.epochs.current + 1 >= schedule.epochs)

    def _is_eval_step(self) -> bool:
        every = self.config.schedule.eval_every_steps
        epoch_end = self.epochs.epoch_done(self.step)
        return (self.step % every == 0 if every else epoch_end) or self.finished() or self.objective.evaluate_now()

    def _save(self) -> Path:
        """Write a checkpoint (every rank takes part)."""
        self.planner.synchronize()
        rank_states = gather_objects({"rng": rng_state(), "stream_position": self.data.position})

        def write(folder: Path) -> dict[str, Any]:
            return {**self.state_dict(rank_states), **self.backend.save(folder)}

        path = self.checkpoints.save(self.step, write)
        log.info("saved %s", path)
        return path

    def train(self) -> dict[str, Any]:
        """Train from the current (or resumed) step to the end; returns the last metrics record.

        At the end, the main rank also writes ``<run_dir>/model.safetensors``: the final weights
        in one file that ``timm.create_model`` loads.
        """
        with lock_run_dir(self.run_dir, self.world, self.device):
            return self._train()

    def _train(self) -> dict[str, Any]:
        self.resume()
        if self.world.is_main and not self.finished():
            write_config(self.run_dir, self.config)
        elif self.world.is_main and self.checkpoints.saved() and not (self.run_dir / WEIGHTS_FILE).is_file():
            # a finished run whose final export had failed (disk full): write it now
            log.info("wrote %s", export(self.checkpoints.saved()[-1][1], self.run_dir / WEIGHTS_FILE))
        config = self.config
        metrics = MetricsLogger(self.run_dir, config.logging.tensorboard) if self.world.is_main else None
        if metrics is not None and self.step == 0 and self.init_record:
            metrics.log({"step": 0, **self.init_record})
        bar = tqdm(total=config.schedule.max_steps or round(config.schedule.epochs * self.dense_epoch_steps),
                   initial=self.step, disable=not (config.logging.progress_bar and self.world.is_main),
                   dynamic_ncols=True, desc="train")
        throughput = self.throughput
        last: dict[str, Any] = {}
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            while not self.finished():
                with self._epoch_batches() as batches:
                    throughput.start()
                    for batch in batches:
                        last = self._run_step(batch, throughput, metrics, bar) or last
                        if self.finished():  # before the epoch's end: max_steps, or the objective's end
                            break
                        throughput.start()
        except DataWaitStopped as stalled:  # between two steps: the last one taken is checkpointed
            saved = self._save()
            raise Preempted(f"{stalled}; checkpoint written at step {self.step} in {saved.parent}; run the same "
                            "command (resume=auto) to continue") from None
        finally:
            self.data.discard_early()
            signal.signal(signal.SIGTERM, previous_handler)
            bar.close()
            if metrics is not None:
                metrics.close()
        return last

    def _run_step(self, batch: Batch, throughput: Throughput, metrics: MetricsLogger | None,
                  bar: tqdm) -> dict[str, Any] | None:
        """One training step, then what is due after it: log, checkpoint, evaluate, stop on SIGTERM.

        The step's metrics line is written before the checkpoint that commits the step, so a run
        killed after the checkpoint still has it; an evaluation writes a line of its own after the
        checkpoint (an evaluation that fails loses nothing). Returns the step's record (with the
        evaluation's metrics) when one was written."""
        config = self.config
        loss = self._train_step(batch)
        self.data.advance(batch, self.epochs.current, self.epochs.offset(self.step))
        self.step += 1
        throughput.add(len(batch.ids) * self.world.world_size)
        self.guard.end_step(self.step, settle=self._is_eval_step() or self.finished()
                            or not self.step % config.logging.every_steps or not self.step % config.checkpoint.every_steps)
        record = None
        evaluate = self._is_eval_step() and bool(self.shards.val_urls) and not self.guard.preempted
        if evaluate or self.guard.preempted or self.step % config.logging.every_steps == 0:
            record = self._step_record(loss, throughput.take())
            if metrics is not None:
                metrics.log(record)
        if self.step % config.checkpoint.every_steps == 0 or self.finished() or self.guard.preempted:
            saved = self._save()
            if self.finished() and self.world.is_main:
                log.info("wrote %s", export(saved, self.run_dir / WEIGHTS_FILE))
        if evaluate:
            self._start_next_epoch_early()
            results = self.evaluator.evaluate_all(
                {"": self.model, **({"_ema": self.ema.module} if self.ema is not None else {})})
            if metrics is not None:
                metrics.log({"step": self.step, **results})
            record.update(results)
            self.objective.observe_evaluation(results)
        if record is not None:
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{record['img_per_s']:.0f}",
                            **({"top1": f"{record['eval_top1']:.2f}"} if "eval_top1" in record else {}))
        if self.guard.preempted:
            raise Preempted(f"SIGTERM: checkpoint written at step {self.step} in {self.checkpoints.folder}; "
                            "run the same command (resume=auto) to continue")
        bar.update(1)
        return record

    def _start_next_epoch_early(self) -> None:
        """At an epoch's end, after its checkpoint, before its evaluation: plan the next epoch and start its loader
        workers, which read and decode while the model is evaluated (no stall when the epoch starts)."""
        if self.epochs.epoch_done(self.step) and not self.finished():
            self.data.start_early(*self._epoch_reading())

    def _epoch_reading(self) -> tuple[int, int, int, Any]:
        """(epoch, start, stop, active samples) of what is left of the current epoch, beginning the next one if due."""
        if self.epochs.epoch_done(self.step):
            self._begin_epoch()
        start, stop = self.epochs.left(self.step, self.config.schedule.max_steps)
        return self.epochs.current, start, stop, self.planner.loader_mask()

    def _epoch_batches(self) -> AbstractContextManager[Iterator[Batch]]:
        """This rank's batches for the rest of the current epoch."""
        return self.data.batches(*self._epoch_reading())
