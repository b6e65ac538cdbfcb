"""Evaluation: several models on the same decoded batches, and the decoded validation set kept for the next
evaluation when it fits data.eval_cache_mb."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_overrides
from trivit.config import load
from trivit.datasets.stream import SampleDecoder
from trivit.datasets.transforms import eval_transform, image_mode
from trivit.engine import evaluation
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World
from trivit.engine.evaluation import Evaluator, PlainInputs
from trivit.engine.startup import resolve_run
from trivit.sparse import create_vit


def evaluator(tiny_shards, tmp_path, **extra: str) -> tuple[Evaluator, dict[str, torch.nn.Module]]:
    setup = resolve_run(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **extra)),
                        World(rank=0, local_rank=0, world_size=1))
    config = setup.config
    decoder = SampleDecoder(eval_transform(config.data, config.model.img_size), image_mode(1), setup.num_classes)
    models = {}
    for seed, suffix in ((0, ""), (1, "_ema")):
        torch.manual_seed(seed)
        models[suffix] = create_vit("deit_tiny_patch16_224", {"tokens": {"keep_rate": 0.5, "locations": [1]}},
                                    num_classes=setup.num_classes, img_size=16, patch_size=4, in_chans=1, embed_dim=32,
                                    depth=2, num_heads=2)
    device = torch.device("cpu")
    return Evaluator(config, setup.world, device, setup.shards.val_urls, PlainInputs(device, None), decoder), models


def counting_loaders(monkeypatch) -> list[int]:
    made = []
    real = evaluation.eval_loader

    def counted(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "eval_loader", counted)
    return made


def test_the_model_and_its_ema_are_evaluated_on_one_pass_over_the_data(tiny_shards, tmp_path, monkeypatch):
    ours, models = evaluator(tiny_shards, tmp_path, **{"data.eval_cache_mb": "0"})
    made = counting_loaders(monkeypatch)
    together = ours.evaluate_all(models)
    assert len(made) == 1, "one loader, one decode of each image, for both models"
    apart = {f"{key}{suffix}": value for suffix, model in models.items() for key, value in ours.evaluate(model).items()}
    assert len(made) == 3 and together == apart
    assert together["eval_samples"] == together["eval_samples_ema"] == 64
    assert together["eval_top1"] != together["eval_top1_ema"] or together["eval_loss"] != together["eval_loss_ema"]


@pytest.mark.parametrize("budget_mb, loaders", [("1", 1), ("0", 3)])
def test_the_decoded_validation_set_is_kept_when_it_fits_the_budget(tiny_shards, tmp_path, monkeypatch, budget_mb,
                                                                      loaders):
    """64 images of 16 x 16 (16 KiB) fit 1 MiB: the second and third evaluations read no shard, with equal results."""
    ours, models = evaluator(tiny_shards, tmp_path, **{"data.eval_cache_mb": budget_mb})
    made = counting_loaders(monkeypatch)
    first = ours.evaluate(models[""])
    assert ours.evaluate(models[""]) == first == ours.evaluate(models[""])
    assert len(made) == loaders
