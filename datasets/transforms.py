"""Image transforms, split where they are cheapest: the loader workers decode, crop, flip and RandAugment, and
hand over uint8 images (4x fewer bytes to copy and pin than float32); the training device normalises and
random-erases the whole batch (:class:`DeviceTransform`), and mixes it (mixup/cutmix, :func:`batch_mixer`).

The split is timm's DeiT pipeline cut in two, with the same random draws in the same order: a worker still
draws random erasing's rectangle (timm's ``RandomErasing``, seeded per sample with the rest), and only the
fill moves to the device, so every image is bit for bit what the one-process pipeline made.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing

from trivit.config import ConfigError
from trivit.datasets.config import DataConfig

NO_ERASE = (0, 0, 0, 0)
"""An erase box (top, left, height, width) that erases nothing."""


class WorkerImages:
    """What a loader worker makes of a decoded PIL image: ``(uint8 image (C, H, W), erase box (4,) int32)``."""

    takes_encoded = False
    """It is given the decoded image (``EncodedImages`` of ``data.decode_on: device`` takes the file's bytes)."""

    def __init__(self, augment: Callable, erasing: RandomErasing | None):
        self.augment, self.erasing = augment, erasing

    def __call__(self, image: object) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.augment(image)
        return pixels, erase_box(self.erasing, pixels.shape[-2], pixels.shape[-1])


def erase_box(erasing: RandomErasing | None, height: int, width: int) -> torch.Tensor:
    """The rectangle timm's ``RandomErasing`` (one region, constant fill) would erase in a ``height`` x ``width``
    image, drawn as it draws it (Python's ``random``): it erases a canvas of ones, and the zeros are the box."""
    if erasing is None:
        return torch.tensor(NO_ERASE, dtype=torch.int32)
    canvas = torch.ones(1, height, width, dtype=torch.uint8)
    erasing(canvas)
    rows = (canvas[0] == 0).any(dim=1).nonzero()
    if not len(rows):
        return torch.tensor(NO_ERASE, dtype=torch.int32)
    cols = (canvas[0] == 0).any(dim=0).nonzero()
    top, left = int(rows[0]), int(cols[0])
    return torch.tensor((top, left, int(rows[-1]) - top + 1, int(cols[-1]) - left + 1), dtype=torch.int32)


def train_transform(data: DataConfig, img_size: int) -> WorkerImages:
    """Random resized crop, flip and RandAugment (or colour jitter) in the worker, as in timm's training pipeline;
    random erasing's box drawn there too (the device fills it)."""
    return WorkerImages(*train_pipeline(data, img_size))


def train_pipeline(data: DataConfig, img_size: int) -> tuple[Callable, RandomErasing | None]:
    """timm's training transform up to the uint8 tensor, and random erasing (constant fill, one region) or None."""
    try:
        augment = create_transform(
            (len(data.mean), img_size, img_size),
            is_training=True,
            scale=tuple(data.scale),
            hflip=data.hflip,
            auto_augment=data.auto_augment,
            color_jitter=data.color_jitter or None,
            interpolation=data.interpolation,
            mean=tuple(data.mean),  # RandAugment fills with the mean colour
            std=tuple(data.std),
            use_prefetcher=True,  # timm's split: the worker stops at a uint8 tensor
        )
    except (AssertionError, KeyError, ValueError) as error:  # timm's policy parser asserts
        raise ConfigError("data.auto_augment", f"got {data.auto_augment!r}, which timm cannot parse ({error}); "
                                               "allowed: a timm policy such as 'rand-m9-mstd0.5-inc1' (RandAugment), "
                                               "'augmix-m5-w4-d2', 'original', 'v0', or null") from None
    erasing = RandomErasing(data.re_prob, mode="const", max_count=1, device="cpu") if data.re_prob > 0 else None
    return augment, erasing


def eval_transform(data: DataConfig, img_size: int) -> WorkerImages:
    """Resize to ``img_size / eval_crop_pct`` and center-crop ``img_size`` in the worker (the device normalises)."""
    augment = create_transform(
        (len(data.mean), img_size, img_size),
        is_training=False,
        crop_pct=data.eval_crop_pct,
        interpolation=data.interpolation,
        mean=tuple(data.mean),
        std=tuple(data.std),
        use_prefetcher=True,
    )
    return WorkerImages(augment, None)


class DeviceTransform:
    """The batch's share of the pipeline, on the device it trains on: uint8 (B, C, H, W) to float32 in [0, 1]
    (as ``ToTensor``), normalised by ``mean`` and ``std`` (as ``Normalize``), then each image's erase box set to
    0 (timm's constant fill, the mean colour). No host sync: the boxes are masks built on the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        pixels = images.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)
        if boxes is None:
            return pixels
        boxes = boxes.to(torch.int64)
        top, left, height, width = boxes.unbind(dim=1)
        rows = torch.arange(pixels.shape[-2], device=pixels.device)
        cols = torch.arange(pixels.shape[-1], device=pixels.device)
        in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
        return pixels.masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)


def batch_mixer(data: DataConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing, or None when both alphas are 0."""
    if data.mixup <= 0 and data.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, label_smoothing=data.label_smoothing,
                 num_classes=num_classes)


def image_mode(in_chans: int) -> str:
    """PIL mode that the decoded images are converted to for a model with ``in_chans`` channels."""
    modes = {1: "L", 3: "RGB"}
    if in_chans not in modes:
        raise ValueError(f"in_chans={in_chans} is not supported by the image pipeline (1 or 3)")
    return modes[in_chans]

