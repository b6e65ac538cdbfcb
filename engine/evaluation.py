"""Evaluation over the validation shards: top-1/top-5, loss and the attention level's density, every
rank reading its share and all ranks stepping together; used by training and by ``trivit eval``."""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from trivit.datasets.loaders import eval_loader
from trivit.datasets.stream import SampleDecoder
from trivit.datasets.transforms import DeviceTransform
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World, sum_tensor
from trivit.sparse import set_keep_rates

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

    def batch_shapes(self) -> int:
        """The most batch sizes one evaluation forwards on a rank: the full batch, each loader worker's last
        (partial) one, and under a launcher the placeholder image of a rank that has run out."""
        return 1 + max(1, self.num_workers) + int(self.world.distributed)

    def evaluate_all(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        """Each model at the schedule's final keep rates; a model's metrics carry its suffix (``eval_top1_ema``)."""
        sparsity = self.config.sparsity
        metrics = {}
        for suffix, model in models.items():
            current = (model.blocks.token_keep_rate, model.blocks.attention_keep_rate)
            set_keep_rates(model, sparsity.tokens.keep_rate, sparsity.attention.keep_rate)
            metrics.update({f"{k}{suffix}": v for k, v in self.evaluate(model).items()})
            set_keep_rates(model, *current)
        return metrics

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """A batch's uint8 images normalised on the evaluation device."""
        return self.device_images(images.to(self.device, non_blocking=True))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, per_class: bool = False) -> dict[str, Any]:
        """Top-1 and top-5 accuracy (%) and mean cross-entropy over the whole validation split, each
        rank reading its share of the shards; with ``per_class``, also each class's top-1
        (``eval_top1_per_class``, None for a class without samples).

        Ranks step through their shares together: one that has run out forwards a placeholder
        image while the others still have batches, so the collectives inside a sharded model
        (FSDP, ZeRO-3) always have every rank.
        """
        inputs, world, device, val_urls = self.inputs, self.world, self.device, self.val_urls
        model_config = self.config.model
        loader = eval_loader(val_urls, self.decoder, batch_size=self.batch_size, rank=world.rank,
                             world_size=world.world_size, num_workers=self.num_workers,
                             pin_memory=device.type == "cuda", timeout_s=self.config.engine.timeout_s)
        was_training = model.training
        model.eval()
        locations = sorted(model.blocks.locations)
        sums = torch.zeros(5 + len(locations), dtype=torch.float64, device=device)
        """correct, samples, summed loss, skipped samples, correct in the top 5, then per location the
        attention density x samples"""
        classes = torch.zeros(2, model.num_classes if per_class else 0, dtype=torch.float64, device=device)
        """per class: correct, samples"""
        placeholder = torch.zeros(1, model_config.in_chans, model_config.img_size, model_config.img_size,
                                  dtype=torch.uint8)
        dtype = next(model.parameters()).dtype  # the fp32 EMA beside a bf16 DeepSpeed module takes fp32 images
        with loader.batches() as batches:
            while True:
                batch = next(batches, None)
                if sum_tensor(torch.tensor([float(batch is not None)], device=device)).item() == 0:
                    break  # no rank has a batch left
                if batch is not None:
                    sums[3] += batch.skipped
                if batch is None or not len(batch.ids):
                    if world.distributed:
                        model(inputs.prepare_inputs(self._images(placeholder)).to(dtype))
                    continue
                labels = batch.labels.to(device)
                with inputs.autocast():
                    logits = model(inputs.prepare_inputs(self._images(batch.images)).to(dtype)).float()
                hits = logits.argmax(-1) == labels
                sums[0] += hits.sum()
                if per_class:
                    classes[0].index_add_(0, labels, hits.double())
                    classes[1].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
                sums[1] += labels.numel()
                sums[2] += nn.functional.cross_entropy(logits, labels, reduction="sum")
                top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                sums[4] += (top5 == labels.unsqueeze(-1)).any(dim=-1).sum()
                for slot, block in enumerate(locations, start=5):
                    if block in model.blocks.attention_density:
                        sums[slot] += model.blocks.attention_density[block] * labels.numel()
        model.train(was_training)
        correct, total, loss_sum, skipped, correct5, *density = sum_tensor(sums).tolist()
        if total == 0:
            log.warning("the validation shards yielded no readable samples (%d skipped); no evaluation this time. "
                        "Check data.val_urls", int(skipped))
            return {"eval_samples": 0, "eval_skipped": int(skipped)}
        record = {"eval_samples": int(total), "eval_top1": 100.0 * correct / total,
                  "eval_top5": 100.0 * correct5 / total, "eval_loss": loss_sum / total, "eval_skipped": int(skipped)}
        if per_class:
            correct_by_class, samples_by_class = sum_tensor(classes).tolist()
            record["eval_top1_per_class"] = [100.0 * c / n if n else None
                                             for c, n in zip(correct_by_class, samples_by_class)]
        if model.blocks.attention_keep_rate < 1:
            record["eval_attention_density"] = {str(block): d / total for block, d in zip(locations, density)}
        return record
