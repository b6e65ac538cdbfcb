"""``data.decode_on: device`` against the reference, the worker path (timm's Pillow pipeline): the same random
draws, each operation painted as Pillow paints it, the whole pipeline within a level, and a training run."""
from __future__ import annotations

import dataclasses
import io
import random

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_ops

from tests.conftest import tiny_overrides
from trivit.config import ConfigError, load
from trivit.datasets.config import DataConfig
from trivit.datasets.device_augment import (
    OPERATIONS,
    PAINTERS,
    DeviceAugment,
    device_augment,
    device_train_transform,
    fill_levels,
)
from trivit.datasets.shards import write_index, write_split
from trivit.datasets.stream import seeded_rng
from trivit.datasets.transforms import train_transform
from trivit.engine.config import TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.trainer import Trainer

PHOTO = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"


def jpeg(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> bytes:
    """A crop of a real photograph (a photo's detail and edges), as JPEG bytes."""
    rng = np.random.default_rng(seed)
    photo = Image.open(PHOTO).convert(mode)
    left, top = int(rng.integers(0, photo.width - size[0])), int(rng.integers(0, photo.height - size[1]))
    buffer = io.BytesIO()
    photo.crop((left, top, left + size[0], top + size[1])).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def levels_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.int32) - b.to(torch.int32)).abs()


ARGUMENTS = {"rotate": [-27.3, 12.0], "posterize": [0, 2, 4, 8], "solarize": [30, 128, 256],
             "solarize_add": [50, 110], "color": [0.1, 1.9], "contrast": [0.1, 1.9], "brightness": [0.1, 1.9],
             "sharpness": [0.1, 1.9], "shear_x": [-0.3, 0.21], "shear_y": [0.3], "translate_x_abs": [-40.0, 13.5],
             "translate_y_abs": [25.0], "translate_x_rel": [0.45, -0.2], "translate_y_rel": [-0.45]}


@pytest.mark.parametrize("name", OPERATIONS)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_each_operation_is_painted_as_pillow_paints_it(name, mode):
    image = Image.open(io.BytesIO(jpeg((64, 48)))).convert(mode)
    fill = tuple(fill_levels(DataConfig().mean))[:len(mode)]
    augment = device_augment(dataclasses.replace(DataConfig(), mean=list(DataConfig().mean)[:len(mode)],
                                                 std=list(DataConfig().std)[:len(mode)]), 64, torch.device("cpu"))
    pixels = torch.from_numpy(np.array(image)).view(48, 64, -1).permute(2, 0, 1)[None].float()
    for argument in ARGUMENTS.get(name, [0.0]):
        timm_function = getattr(timm_ops, name)
        reference = np.array(timm_function(image, argument, fillcolor=fill, resample=Image.BICUBIC)
                             if name in ARGUMENTS else timm_function(image))
        reference = torch.from_numpy(reference).view(48, 64, -1).permute(2, 0, 1)[None]
        painted = PAINTERS[name](augment, pixels, torch.tensor(float(argument)).view(1, 1, 1, 1))
        apart = levels_apart(painted, reference)
        assert apart.max() <= 1, f"{name}({argument}): {int(apart.max())} levels apart"
        assert (apart > 0).float().mean() < 0.005, f"{name}({argument}): {(apart > 0).float().mean():.2%} differ"


def read_both(config: DataConfig, files: list[bytes], mode: str, size: int):
    """(worker path, device path) images of ``files`` under per-sample seeds, and the next random numbers."""
    worker, drawn = train_transform(config, size), device_train_transform(config, size)
    augment = device_augment(config, size, torch.device("cpu"))
    reference, payloads, plans, after = [], [], [], []
    for seed, data in enumerate(files):
        with seeded_rng(seed):
            pixels, box = worker(Image.open(io.BytesIO(data)).convert(mode))
            after.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
        reference.append(pixels)
        with seeded_rng(seed), Image.open(io.BytesIO(data)) as header:
            payload, drawn_box, plan = drawn(data, header, mode)
            assert after[-1] == (random.random(), float(np.random.rand()), float(torch.rand(1))), \
                "the device plan draws exactly the random numbers the worker path draws"
        assert torch.equal(box, drawn_box)
        payloads.append(payload)
        plans.append(plan)
    return torch.stack(reference), augment(payloads, torch.stack(plans)), payloads


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_device_pipeline_makes_the_worker_pipelines_images_within_a_level(mode):
    config = DataConfig() if mode == "RGB" else DataConfig(mean=[0.5], std=[0.5])
    files = [jpeg((160 + 8 * (i % 5), 120 + 4 * (i % 7)), mode, seed=i) for i in range(48)]
    files.append(png(files[0], mode))  # not a JPEG: the worker decodes it, the device paints it
    reference, painted, payloads = read_both(config, files, mode, 64)
    assert painted.shape == reference.shape == (49, len(mode), 64, 64) and painted.dtype == torch.uint8
    assert all(p.dim() == 1 for p in payloads[:-1]) and payloads[-1].dim() == 3, "JPEG as bytes, PNG decoded"
    apart = levels_apart(painted, reference)
    assert apart.float().mean() < 0.01, f"{apart.float().mean():.4f} levels apart on average"
    assert (apart > 1).float().mean() < 0.002, "beyond one level only where a threshold flips (solarize, posterize)"


def png(data: bytes, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("setting, value, key", [("auto_augment", "augmix-m5-w4-d2", "data.decode_on"),
                                                  ("auto_augment", None, None),
                                                  ("interpolation", "lanczos", "data.interpolation")])
def test_what_the_device_cannot_paint_is_refused_at_start_up(setting, value, key):
    config = dataclasses.replace(DataConfig(), **{setting: value})
    if key is None:  # colour jitter (no auto-augment) has no device version either
        config = dataclasses.replace(config, color_jitter=0.0)
        device_train_transform(config, 32)
        with pytest.raises(ConfigError, match="data.decode_on.*ColorJitter"):
            device_train_transform(dataclasses.replace(config, color_jitter=0.3), 32)
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        device_train_transform(config, 32)


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """train: 4 shards x 32 RGB JPEGs (24 x 20, from the photo); val: 1 shard; 4 classes by image brightness."""
    folder = tmp_path_factory.mktemp("jpeg_shards")

    def samples(count: int, offset: int):
        for i in range(count):
            data = jpeg((24, 20), seed=offset + i)
            label = min(3, int(np.asarray(Image.open(io.BytesIO(data))).mean() // 48))
            yield {"__key__": f"{i:08d}", "jpg": data, "cls": label, "id": i}

    splits = {"train": write_split(samples(128, 0), folder, "train", 32),
              "val": write_split(samples(32, 1000), folder, "val", 32)}
    write_index(folder, splits, [f"class{i}" for i in range(4)])
    return folder


def test_a_run_decoding_on_the_device_logs_the_worker_runs_losses(jpeg_shards, tmp_path, monkeypatch):
    painted = []
    paint = DeviceAugment.__call__
    monkeypatch.setattr(DeviceAugment, "__call__", lambda self, payloads, plan: painted.append(len(payloads))
                        or paint(self, payloads, plan))

    def run(name: str, decode_on: str) -> list[float]:
        overrides = tiny_overrides(jpeg_shards, tmp_path / name, **{
            "data.train_urls": str(jpeg_shards / "train-{000000..000003}.tar"),
            "data.val_urls": str(jpeg_shards / "val-000000.tar"), "data.mean": "[0.5,0.4,0.4]",
            "data.std": "[0.25,0.25,0.25]", "model.in_chans": "3", "data.auto_augment": "rand-m9-mstd0.5-inc1",
            "data.hflip": "0.5", "data.scale": "[0.3,1.0]", "data.decode_on": decode_on, "schedule.max_steps": "6"})
        Trainer(load(TrainConfig, None, overrides)).train()
        return [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]

    worker, device = run("worker", "worker"), run("device", "device")
    assert len(worker) == len(device) == 6 and painted == [16] * 6, "the device decoded every batch"
    assert np.allclose(worker, device, rtol=0, atol=2e-3), (worker, device)
