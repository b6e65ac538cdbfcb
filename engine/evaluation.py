"""Evaluation over the validation shards: top-1/top-5, loss and the attention level's density, every
rank reading its share and all ranks stepping together; used by training and by ``trivit eval``."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch
from torch import nn

from trivit.datasets.loaders import eval_loader
from trivit.datasets.stream import Batch, SampleDecoder
from trivit.datasets.transforms import DeviceTransform
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World, sum_tensor
from trivit.sparse import set_keep_rates
from trivit.sparse.schedule import final_keep_rates

log = logging.getLogger(__name__)


class InputPath(Protocol):
    """How images reach the model: a training backend, or :class:`PlainInputs`."""

    def autocast(self) -> AbstractContextManager: ...

    def prepare_inputs(self, images: torch.Tensor) -> torch.Tensor: ...


class PlainInputs:
    """Images to ``device``, the forward pass under autocast in ``amp_dtype`` (None = fp32)."""

    def __init__(self, device: torch.device, amp_dtype: torch.dtype | None):
        self.device, self.amp_dtype = device, amp_dtype

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def prepare_inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True)


def rank_eval_batch(eval_batch_size: int, world_size: int) -> int:
    """Images a rank forwards at a time: ``data.eval_batch_size`` is global, shared over the ranks (rounded up)."""
    return -(-eval_batch_size // world_size)


class Evaluator:
    """Evaluates models (a run's trained model, its EMA) on validation shards ``val_urls``."""

    def __init__(self, config: TrainConfig, world: World, device: torch.device, val_urls: list[str],
                 inputs: InputPath, decoder: SampleDecoder):
        self.config, self.world, self.device, self.val_urls = config, world, device, val_urls
        self.inputs, self.decoder = inputs, decoder
        self.device_images = DeviceTransform(config.data.mean, config.data.std, device)
        self.batch_size = rank_eval_batch(config.data.eval_batch_size, world.world_size)
        self.num_workers = min(config.data.num_workers, len(val_urls))
        self.cache: list[Batch] | None = None
        """This rank's decoded validation batches, once an evaluation has read them all within the budget."""

    def batch_shapes(self) -> int:
        """The most batch sizes one evaluation forwards on a rank: the full batch, each loader worker's last
        (partial) one, and under a launcher the placeholder image of a rank that has run out."""
        return 1 + max(1, self.num_workers) + int(self.world.distributed)

    def evaluate_all(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        """Each model at the schedule's final keep rates (:func:`final_keep_rates`), all on the same decoded batches;
        a model's metrics carry its suffix (``eval_top1_ema``)."""
        current = {suffix: (m.blocks.token_keep_rate, m.blocks.attention_keep_rate) for suffix, m in models.items()}
        for model in models.values():
            set_keep_rates(model, *final_keep_rates(self.config.sparsity))
        results = self.evaluate_models(models)
        for suffix, model in models.items():
            set_keep_rates(model, *current[suffix])
        return {f"{key}{suffix}": value for suffix, record in results.items() for key, value in record.items()}

    def evaluate(self, model: nn.Module, per_class: bool = False) -> dict[str, Any]:
        """:meth:`evaluate_models` of one model."""
        return self.evaluate_models({"": model}, per_class)[""]

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """A batch's uint8 images normalised on the evaluation device."""
        return self.device_images(images.to(self.device, non_blocking=True))

    def _batches(self) -> Iterator[Batch | None]:
        """This rank's validation batches, then None for as long as any rank still has one (every rank steps
        together). The decoded uint8 batches are kept for the next evaluation while they fit
        ``data.eval_cache_mb`` (the validation transform draws nothing at random: the same pixels)."""
        device = self.device
        if self.cache is not None:
            source = iter(self.cache)
        else:
            loader = eval_loader(self.val_urls, self.decoder, batch_size=self.batch_size, rank=self.world.rank,
                                 world_size=self.world.world_size, num_workers=self.num_workers,
                                 pin_memory=device.type == "cuda", timeout_s=self.config.engine.timeout_s)
            source = None
        kept: list[Batch] | None = []
        budget = self.config.data.eval_cache_mb * 2 ** 20
        with loader.batches() if source is None else nullcontext(source) as batches:
            while True:
                batch = next(batches, None)
                if sum_tensor(torch.tensor([float(batch is not None)], device=device)).item() == 0:
                    break  # no rank has a batch left
                if kept is not None and batch is not None and self.cache is None:
                    kept.append(batch)
                    if sum(b.images.numel() for b in kept) > budget:
                        kept = None
                yield batch
        if self.cache is None and kept is not None and budget > 0:
            self.cache = kept

    @torch.no_grad()
    def evaluate_models(self, models: dict[str, nn.Module], per_class: bool = False) -> dict[str, dict[str, Any]]:
        """Top-1 and top-5 accuracy (%) and mean cross-entropy over the whole validation split of each model, all
        forwarding the same decoded batches, each rank reading its share; with ``per_class``, also each class's
        top-1 (``eval_top1_per_class``, None for a class without samples).

        Ranks step through their shares together: one that has run out forwards a placeholder image while the
        others still have batches, so the collectives inside a sharded model (FSDP, ZeRO-3) always have every rank.
        """
        inputs, device, model_config = self.inputs, self.device, self.config.model
        tallies = {suffix: Tally(model, per_class, device) for suffix, model in models.items()}
        placeholder = torch.zeros(1, model_config.in_chans, model_config.img_size, model_config.img_size,
                                  dtype=torch.uint8)
        skipped = 0
        for batch in self._batches():
            if batch is not None:
                skipped += batch.skipped
            images = self._images(placeholder if batch is None or not len(batch.ids) else batch.images)
            labels = None if batch is None or not len(batch.ids) else batch.labels.to(device)
            for tally in tallies.values():
                if labels is None:
                    if self.world.distributed:
                        tally.model(inputs.prepare_inputs(images).to(tally.dtype))
                    continue
                with inputs.autocast():
                    logits = tally.model(inputs.prepare_inputs(images).to(tally.dtype)).float()
                tally.add(logits, labels)
        return {suffix: tally.result(skipped) for suffix, tally in tallies.items()}


class Tally:
    """One model's evaluation sums over the batches, and its record at the end."""

    def __init__(self, model: nn.Module, per_class: bool, device: torch.device):
        self.model, self.per_class = model, per_class
        self.was_training = model.training
        model.eval()
        self.dtype = next(model.parameters()).dtype  # the fp32 EMA beside a bf16 DeepSpeed module takes fp32 images
        self.locations = sorted(model.blocks.locations)
        self.sums = torch.zeros(4 + len(self.locations), dtype=torch.float64, device=device)
        """correct, samples, summed loss, correct in the top 5, then per location the attention density x samples"""
        self.classes = torch.zeros(2, model.num_classes if per_class else 0, dtype=torch.float64, device=device)
        """per class: correct, samples"""

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        sums, blocks = self.sums, self.model.blocks
        hits = logits.argmax(-1) == labels
        sums[0] += hits.sum()
        if self.per_class:
            self.classes[0].index_add_(0, labels, hits.double())
            self.classes[1].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        sums[1] += labels.numel()
        sums[2] += nn.functional.cross_entropy(logits, labels, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        sums[3] += (top5 == labels.unsqueeze(-1)).any(dim=-1).sum()
        for slot, block in enumerate(self.locations, start=4):
            if block in blocks.attention_density:
                sums[slot] += blocks.attention_density[block] * labels.numel()

    def result(self, skipped_here: int) -> dict[str, Any]:
        """The record, summed over the ranks (every rank calls it)."""
        self.model.train(self.was_training)
        sums = torch.cat([self.sums, torch.tensor([float(skipped_here)], dtype=torch.float64, device=self.sums.device)])
        correct, total, loss_sum, correct5, *density, skipped = sum_tensor(sums).tolist()
        if total == 0:
            log.warning("the validation shards yielded no readable samples (%d skipped); no evaluation this time. "
                        "Check data.val_urls", int(skipped))
            return {"eval_samples": 0, "eval_skipped": int(skipped)}
        record = {"eval_samples": int(total), "eval_top1": 100.0 * correct / total,
                  "eval_top5": 100.0 * correct5 / total, "eval_loss": loss_sum / total, "eval_skipped": int(skipped)}
        if self.per_class:
            correct_by_class, samples_by_class = sum_tensor(self.classes).tolist()
            record["eval_top1_per_class"] = [100.0 * c / n if n else None
                                             for c, n in zip(correct_by_class, samples_by_class)]
        if self.model.blocks.attention_keep_rate < 1:
            record["eval_attention_density"] = {str(block): d / total for block, d in zip(self.locations, density)}
        return record
