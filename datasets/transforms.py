"""Image transforms (timm's DeiT-style train and eval pipelines) and batch-level mixup/cutmix."""
from __future__ import annotations

from collections.abc import Callable

from timm.data import Mixup, create_transform

from trivit.config import ConfigError
from trivit.datasets.config import DataConfig


def train_transform(data: DataConfig, img_size: int) -> Callable:
    """Random resized crop, flip, RandAugment and random erasing, as in timm's training pipeline."""
    try:
        return create_transform(
            (len(data.mean), img_size, img_size),
            is_training=True,
            scale=tuple(data.scale),
            hflip=data.hflip,
            auto_augment=data.auto_augment,
            color_jitter=data.color_jitter or None,
            re_prob=data.re_prob,
            interpolation=data.interpolation,
            mean=tuple(data.mean),
            std=tuple(data.std),
        )
    except (AssertionError, KeyError, ValueError) as error:  # timm's policy parser asserts
        raise ConfigError("data.auto_augment", f"got {data.auto_augment!r}, which timm cannot parse ({error}); "
                                               "allowed: a timm policy such as 'rand-m9-mstd0.5-inc1' (RandAugment), "
                                               "'augmix-m5-w4-d2', 'original', 'v0', or null") from None


def eval_transform(data: DataConfig, img_size: int) -> Callable:
    """Resize to ``img_size / eval_crop_pct``, center-crop ``img_size``, normalise."""
    return create_transform(
        (len(data.mean), img_size, img_size),
        is_training=False,
        crop_pct=data.eval_crop_pct,
        interpolation=data.interpolation,
        mean=tuple(data.mean),
        std=tuple(data.std),
    )


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

