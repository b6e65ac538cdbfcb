"""``trivit prune``: NViT's global structural pruning of a trained ViT, under a latency target.

The run is a training run (any backend, checkpoints, ``resume=auto``, SIGTERM) of the source
model at its full widths as a pruned architecture (sparse/pruned.py), whose objective is the
label loss plus a distillation to the frozen unpruned model, and which also:

- accumulates every unit's saliency from each step's reduced gradients (the backend's
  ``gradient_hook``: whole tensors on every rank, gathered where sharded);
- every ``prune.every_steps`` steps masks the lowest-scoring groups (sparse/nvit.py) until the
  block latency by the table has fallen by ``prune.latency_step``, on every rank alike;
- ends once the target latency is met, with ``model.safetensors`` holding the stripped model
  and ``arch.json`` its architecture (the export of a pruning checkpoint strips the masked
  units, engine/model/build.py), ready for ``trivit train model.init_from=RUN_DIR``.

Masked units contribute nothing and receive no gradient, whatever the backend or its sharding;
at each pruning step their weights and optimizer state are also set to zero (the backend's
``zero_entries``, shard by shard), so the checkpoints hold what the model computes, as in NViT.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trivit.config import ConfigError
from trivit.engine.backends.base import NamedGradients
from trivit.engine.config import DistillConfig, PruneConfig, TrainConfig
from trivit.engine.model.artefacts import UNIT_MASKS
from trivit.engine.model.build import build_training_model, model_arch
from trivit.engine.objectives.distill import Distiller, soft_distillation
from trivit.engine.trainer import Trainer
from trivit.methods import check_composition
from trivit.sparse import create_vit, set_keep_rates
from trivit.sparse.latency import LatencyTable, measure_checked_table
from trivit.sparse.nvit import (
    CODE_DIVISORS,
    CODE_MOMENTUM,
    SaliencyMeter,
    choose_groups,
    code_saliency_axes,
    floor_arch,
    floor_units,
    group_sizes,
    normalised,
)
from trivit.sparse.pruned import PrunedArch, pruned_entries, set_unit_masks, unit_axes
from trivit.sparse.taps import NOTHING_TAPPED, Tapped

log = logging.getLogger(__name__)

CODE_KL_WEIGHT = 1e5
"""``saliency: code``: the weight of the KL to the unpruned model (the authors' ``kl_loss_coeff``)."""
TABLE_FILE = "latency_table.json"
HISTORY_FILE = "prune.json"


class PruningObjective(Distiller):
    """Distillation to the unpruned model, the saliency meter and the masks: the pruning run's state."""

    def __init__(self, config: PruneConfig, teacher: nn.Module, amp_dtype: torch.dtype | None, model: nn.Module,
                 arch: PrunedArch, table: LatencyTable, device: torch.device,
                 zero_entries: Callable[[dict[str, torch.Tensor]], None]):
        """``zero_entries``: the backend's, which zeroes entries of the parameters and their optimizer state."""
        distill = DistillConfig(loss="soft", teacher="the unpruned model", alpha=config.alpha, tau=config.temperature)
        super().__init__(distill, teacher, amp_dtype)
        self.prune, self.model, self.arch, self.table, self.device = config, model, arch, table, device
        self.sizes = group_sizes(arch)
        self.masks = {group: torch.ones(size) for group, size in arch.unit_counts().items()}
        self.axes = unit_axes(model, arch)
        """Every parameter's entries of each unit: what a pruning step zeroes."""
        code = config.saliency == "code"
        self.meter = (SaliencyMeter(code_saliency_axes(self.axes), arch.unit_counts(), CODE_DIVISORS) if code
                      else SaliencyMeter(self.axes, arch.unit_counts()))
        self.averaged: dict[str, torch.Tensor] | None = None
        """``saliency: code``: the moving average of the scores over pruning steps (None before the first)."""
        self.zero_entries = zero_entries
        self.shapes = {name: getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the whole shape there
                       for name, param in model.named_parameters() if name in self.axes}
        self.base_ms = table.model_ms(arch)
        self.floors = floor_units(arch, self.sizes, config.min_widths)
        self.floor_fraction = table.model_ms(floor_arch(arch, self.sizes, self.floors)) / self.base_ms
        """The block latency of the smallest architecture ``prune.min_widths`` allows, over the unpruned one's."""
        self.steps = 0
        self.history: list[dict[str, Any]] = []
        self.stopped = ""
        """Why pruning stopped short of the target (no group left to remove, accuracy collapsed); "" while it goes on."""
        self.start_top1: float | None = None
        """The unpruned model's evaluation top-1 (what ``prune.min_accuracy`` is a fraction of)."""
        self.evaluate_teacher: Callable[[], float] | None = None
        """Evaluates the unpruned model (the pruning run's evaluator on the teacher): once, when first needed."""
        set_unit_masks(model, self._device_masks())  # all kept: the tensors later steps update in place

    @property
    def latency_fraction(self) -> float:
        """The masked model's block latency over the unpruned one's, by the table."""
        return self.table.model_ms(self.arch.kept(self.masks)) / self.base_ms

    def target_met(self) -> bool:
        return self.latency_fraction <= self.prune.target_latency + 1e-9

    ends_with_the_epochs = False

    def finished(self) -> bool:
        """The target is met, or pruning stopped short of it (epochs go on until then)."""
        return self.target_met() or bool(self.stopped)

    def evaluate_now(self) -> bool:
        """Every pruning step is evaluated too, so that a collapse shows while it happens."""
        return self.pruned_at(self.steps)

    @property
    def gradient_hook(self) -> Callable[[NamedGradients], None]:
        return self.add_gradients

    def add_gradients(self, gradients: NamedGradients) -> None:
        """The backend's gradient hook: one batch of saliency, unless the target is already met."""
        if self.target_met():
            for _ in gradients:  # the collectives of sharded backends still run on every rank
                pass
            return
        self.meter.add(gradients)

    def step(self, lr: float) -> None:
        self.steps += 1
        if self.steps % self.prune.every_steps or self.target_met():
            return
        masks = {group: mask.clone() for group, mask in self.masks.items()}
        budget = min(self.prune.latency_step, self.latency_fraction - self.prune.target_latency) * self.base_ms
        chosen = choose_groups(self._scores(masks), masks, self.arch, self.sizes, self.table,
                               self._latency_weight(), budget, self.floors)
        self.masks = _same_on_every_rank(masks)
        set_unit_masks(self.model, self._device_masks())
        self.zero_entries({name: pruned_entries(shape, self.axes[name], self.masks)
                           for name, shape in self.shapes.items()})
        self.meter.reset()
        self.history.append({"step": self.steps, "latency_fraction": self.latency_fraction,
                             "removed": [{"group": c.group, "units": len(c.units), "saliency": c.saliency,
                                          "saved_ms": c.saved_ms} for c in chosen],
                             "arch": dataclasses.asdict(self.arch.kept(self.masks))})
        log.info("pruned at step %d: removed %d groups, block latency %.3f of the unpruned model's (target %.3f); %s",
                 self.steps, len(chosen), self.latency_fraction, self.prune.target_latency,
                 arch_summary(self.arch.kept(self.masks)))
        if not chosen:
            self.stopped = (f"no group can be removed any more without going below prune.min_widths "
                            f"{self.prune.min_widths}: the block latency stays at {self.latency_fraction:.3f} of the "
                            f"unpruned model's, above the target {self.prune.target_latency}")
            log.warning("pruning stops: %s", self.stopped)

    def _scores(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This pruning step's unit scores: ``paper``, the mean since the last step normalised per kind; ``code``,
        the moving average of the means (the first step's mean as it is)."""
        saliency = self.meter.saliency()
        if self.prune.saliency == "paper":
            return normalised(saliency, masks)
        if self.averaged is not None:
            saliency = {g: CODE_MOMENTUM * self.averaged[g] + (1 - CODE_MOMENTUM) * s for g, s in saliency.items()}
        self.averaged = saliency
        return saliency

    def _latency_weight(self) -> float:
        """lambda as :func:`choose_groups` takes it (per share of the unpruned latency): ``code`` prices each
        millisecond at ``prune.code_latency_weight``."""
        if self.prune.saliency == "paper":
            return self.prune.latency_weight
        return self.prune.code_latency_weight * self.base_ms

    def objective(self, label_losses: torch.Tensor, logits: torch.Tensor, images: torch.Tensor,
                  targets: torch.Tensor, tapped: Tapped = NOTHING_TAPPED) -> torch.Tensor:
        """``paper``: Distiller's (1 - alpha) x label loss + alpha x tau^2 KL / classes. ``code``: the label loss +
        1e5 x KL / classes at ``temperature`` (no tau^2), the KL from the first pruning step on."""
        if self.prune.saliency == "paper":
            return super().objective(label_losses, logits, images, targets, tapped)
        if not self.history:
            return label_losses
        tau = self.prune.temperature
        kl = soft_distillation(logits, self.teacher_logits(images), tau) / (tau * tau)
        return label_losses + CODE_KL_WEIGHT * kl

    def metrics(self) -> dict[str, Any]:
        kept = self.arch.kept(self.masks)
        return {"prune/latency_fraction": self.latency_fraction, "prune/steps": self.steps // self.prune.every_steps,
                "prune/embed": kept.embed_dim, "prune/heads": sum(b.heads for b in kept.blocks),
                "prune/mlp": sum(b.mlp_dim for b in kept.blocks)}

    def observe_evaluation(self, results: dict[str, Any]) -> None:
        """Stop pruning when the model's top-1 falls below ``prune.min_accuracy`` of the unpruned model's."""
        top1, floor = results.get("eval_top1"), self.prune.min_accuracy
        if top1 is None or floor is None:
            return
        if self.start_top1 is None and self.evaluate_teacher is not None:
            self.start_top1 = self.evaluate_teacher()
            log.info("the unpruned model's top-1: %.2f%% (prune.min_accuracy=%s of it stops pruning)",
                     self.start_top1, floor)
        if self.start_top1 is None:
            return
        log.info("pruned model at block latency %.3f: top-1 %.2f%% (the unpruned model's %.2f%%)",
                 self.latency_fraction, top1, self.start_top1)
        if top1 < floor * self.start_top1 and not self.stopped:
            self.stopped = (f"the pruned model's top-1 fell to {top1:.2f}%, below prune.min_accuracy={floor} of the "
                            f"unpruned model's {self.start_top1:.2f}%, at block latency {self.latency_fraction:.3f}")
            log.warning("pruning stops: %s", self.stopped)

    def pruned_at(self, step: int) -> bool:
        """Whether the objective's step ``step`` (1-based) was a pruning step."""
        return step > 0 and step % self.prune.every_steps == 0

    def _device_masks(self) -> dict[str, torch.Tensor]:
        return {group: mask.to(self.device) for group, mask in self.masks.items()}

    def state_dict(self) -> dict[str, Any]:
        return {UNIT_MASKS: {g: m.clone() for g, m in self.masks.items()}, "meter": self.meter.state_dict(),
                "averaged": self.averaged,
                "steps": self.steps, "history": self.history, "latency_table": dataclasses.asdict(self.table),
                "stopped": self.stopped, "start_top1": self.start_top1}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None or UNIT_MASKS not in state:
            raise ValueError("the checkpoint to resume was not written by `trivit prune` (it holds no unit masks); "
                             "prune into a new run_dir")
        table = state.get("latency_table")
        if table is not None and table != dataclasses.asdict(self.table):
            raise ValueError("the latency table this pruning run started with differs from the one it would resume "
                             f"with ({self.prune.latency_table or TABLE_FILE}); its pruning steps so far were chosen "
                             "by the first: restore that table to continue, or prune into a new run_dir")
        self.masks = {g: m.clone().float() for g, m in state[UNIT_MASKS].items()}
        self.meter.load_state_dict(state["meter"])
        self.averaged = state.get("averaged")
        self.steps, self.history = state["steps"], list(state["history"])
        self.stopped = state.get("stopped", "")
        self.start_top1 = state.get("start_top1", self.start_top1)
        set_unit_masks(self.model, self._device_masks())


def arch_summary(arch: PrunedArch) -> str:
    """An architecture in one line: embedding width, and per block heads / MLP units."""
    return (f"embed {arch.embed_dim}, heads {[b.heads for b in arch.blocks]}, "
            f"mlp {[b.mlp_dim for b in arch.blocks]}")


def _same_on_every_rank(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's masks (every rank computed them from the same gradients; this makes float ties moot)."""
    if not dist.is_initialized():
        return masks
    holder = [masks]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class Pruner:
    """The pruning run: a :class:`Trainer` given the source at its full widths (and a frozen copy of it, the teacher)
    and the :class:`PruningObjective`, which brings its gradient hook, its evaluations and its end."""

    def __init__(self, config: TrainConfig):
        check_prunable(config)
        self.config = config
        self.trainer = trainer = Trainer(config, build_model=self._build_model)
        if trainer.amp_dtype == torch.float16:
            raise ConfigError("engine.precision", "got fp16; pruning reads the gradients unscaled: use bf16 or fp32")
        table = self._latency_table()
        table.check_fits(self.arch)
        objective = PruningObjective(config.prune, self.teacher.to(trainer.device), trainer.amp_dtype, trainer.model,
                                     self.arch, table, trainer.device, trainer.backend.zero_entries)
        check_target_reachable(config.prune, objective.floor_fraction, table)
        objective.evaluate_teacher = lambda: trainer.evaluator.evaluate(self.teacher)["eval_top1"]
        trainer.use_objective(objective)
        self.objective = objective

    def _build_model(self, config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
        self.arch = model_arch(config) or full_widths(config, num_classes)
        model, record = build_training_model(config, num_classes, self.arch)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        set_keep_rates(self.teacher, 1.0, 1.0)  # the unpruned model, dense
        return model, record

    def _latency_table(self) -> LatencyTable:
        prune, trainer = self.config.prune, self.trainer
        if prune.latency_table is not None:
            return LatencyTable.load(prune.latency_table)
        path = trainer.run_dir / TABLE_FILE
        if trainer.world.is_main and not path.is_file():
            log.info("measuring a block latency table of %s on %s (prune.latency_table names a measured one)",
                     self.config.model.name, trainer.device)
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            table = measure_checked_table(self.config.model.name, self.config.model.timm_arguments(),
                                          group_sizes(self.arch), trainer.device, prune.table_batch, repeats=5)
            table.save(path)
        if dist.is_initialized():
            dist.barrier()
        return LatencyTable.load(path)

    def prune(self) -> dict[str, Any]:
        """Prune to the target; returns a summary (the history is also in run_dir/prune.json)."""
        objective, trainer = self.objective, self.trainer
        trainer.train()
        summary = {"target_met": objective.target_met(), "latency_fraction": objective.latency_fraction,
                   "target_latency": self.config.prune.target_latency, "steps": trainer.step,
                   "stopped": objective.stopped, "start_top1": objective.start_top1,
                   "arch": dataclasses.asdict(self.arch.kept(objective.masks)), "history": objective.history}
        if trainer.world.is_main:
            (trainer.run_dir / HISTORY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def check_target_reachable(prune: PruneConfig, floor: float, table: LatencyTable) -> None:
    """A target below the latency of the smallest architecture ``prune.min_widths`` allows can never be met."""
    if prune.target_latency < floor + 1e-9:
        reachable = math.ceil((floor + 0.02) * 100) / 100
        raise ConfigError("prune.target_latency", f"got {prune.target_latency}, but the table's floor is {floor:.3f} of "
                                                  f"the unpruned latency at these sizes (the smallest model "
                                                  f"prune.min_widths={prune.min_widths} allows; table measured at batch "
                                                  f"{table.batch_size}, {table.tokens} tokens): ask for >= {reachable}, "
                                                  "lower prune.min_widths, or measure the table at the batch and token "
                                                  "count you train with")


def full_widths(config: TrainConfig, num_classes: int) -> PrunedArch:
    """The architecture of timm's ``model.name`` as the run builds it: every block at its full widths."""
    with torch.device("meta"):
        model = create_vit(config.model.name, None, **dict(config.model.timm_arguments(), num_classes=num_classes))
    return PrunedArch.of_vit(config.model.name, model)


def check_prunable(config: TrainConfig) -> None:
    """What cannot compose with pruning, refused at start-up."""
    if not config.model.init_from:
        raise ConfigError("model.init_from", "trivit prune needs the trained model to prune: --from RUN_DIR, a "
                                             "checkpoint folder or a weights file")
    check_composition(config, pruning=True)
    if config.optim.ema_decay is not None:
        raise ConfigError("optim.ema_decay", "an EMA would average weights across pruning steps (it would keep the "
                                             "removed units alive); set optim.ema_decay=null to prune")
    if config.model.arch is not None and Path(config.model.arch).resolve() == Path(config.run_dir, "arch.json").resolve():
        raise ConfigError("model.arch", "names the arch.json this run will write; prune into another run_dir")
