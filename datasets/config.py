"""Configuration of the data pipeline: where the shards are, batching, augmentation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trivit.config import check, finite

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(kw_only=True)
class DataConfig:
    """Data pipeline. Defaults follow the DeiT recipe (timm augmentation, mixup 0.8, cutmix 1.0)."""

    source: str = "fashion-mnist"
    """Built-in source whose shards are prepared in ``cache_dir`` when ``train_urls`` is empty."""
    cache_dir: str = "~/.cache/trivit"
    """Where prepared built-in sources are kept."""
    train_urls: str = ""
    """Training shards: brace-expanded paths or ``pipe:`` commands, several joined with '::'."""
    val_urls: str = ""
    """Validation shards, same syntax."""
    index: str = ""
    """The shards' JSON index (per-shard counts, class names); default: index.json beside the train shards."""
    batch_size: int = 256
    """Global batch size, summed over all ranks."""
    eval_batch_size: int = 256
    """Global evaluation batch size: each rank forwards ceil(eval_batch_size / world size) images at a time."""
    num_workers: int = 2
    """Loader worker processes per rank. Resuming a run needs the same value (the sample order depends on it)."""
    shuffle_buffer: int = 2000
    """Samples held in each worker's shuffle buffer."""
    eval_cache_mb: int = 1024
    """Keep each rank's decoded validation images (uint8) in memory after the first evaluation when they fit this
    many MiB (ImageNet's 50,000 at 224 px are 7.5 GB in all: 940 MiB a rank on 8 GPUs); 0: decode every time."""
    shuffle_initial: int = 64
    """Samples a worker's shuffle buffer holds before it hands out the first (it keeps filling to
    ``shuffle_buffer`` as it goes): an epoch's first batch comes after this many reads, not ``shuffle_buffer``."""
    decode_on: Literal["worker", "device"] = "worker"
    """Where training images are decoded and augmented: ``worker`` (the loader workers, the reference) or
    ``device`` (workers draw the augmentation and hand over the JPEG bytes; the training device decodes, with
    nvJPEG on CUDA, and paints the drawn crop, flip, RandAugment: datasets/device_augment.py). Evaluation images
    are decoded by the workers either way (and cached: ``eval_cache_mb``)."""
    resampled: bool = False
    """Each worker draws training shards with replacement (no split by rank and worker; any shard count works)."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Area range of timm's random resized crop."""
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy string, or null for none."""
    color_jitter: float = 0.3
    """Color jitter strength, applied only when auto_augment is null (as in timm)."""
    re_prob: float = 0.25
    """Random erasing probability."""
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos", "hamming", "box"] = "bicubic"
    eval_crop_pct: float = 0.875
    """Evaluation: resize to img_size / eval_crop_pct, then center-crop img_size."""
    mixup: float = 0.8
    """Mixup alpha (0 = off)."""
    cutmix: float = 1.0
    """CutMix alpha (0 = off)."""
    label_smoothing: float = 0.1
    max_bad_fraction: float = 0.01
    """Stop with an error once more than this fraction of the samples read is unreadable (they are skipped)."""

    def __post_init__(self) -> None:
        check(self.batch_size > 0, "batch_size", self.batch_size, "a positive integer")
        check(self.eval_batch_size > 0, "eval_batch_size", self.eval_batch_size, "a positive integer")
        check(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "an integer >= 1")
        check(1 <= self.shuffle_initial, "shuffle_initial", self.shuffle_initial, "an integer >= 1")
        check(self.eval_cache_mb >= 0, "eval_cache_mb", self.eval_cache_mb, "MiB >= 0")
        check(len(self.mean) in (1, 3) and finite(*self.mean), "mean", self.mean,
              "one finite value per image channel (1 or 3 values)")
        check(len(self.std) == len(self.mean), "std", self.std, f"as many values as data.mean ({len(self.mean)})")
        check(all(s > 0 for s in self.std) and finite(*self.std), "std", self.std, "positive finite values")
        check(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "scale", self.scale,
              "[min, max] with 0 < min <= max <= 1")
        check(0 <= self.hflip <= 1, "hflip", self.hflip, "a probability in [0, 1]")
        check(self.color_jitter >= 0, "color_jitter", self.color_jitter, "a strength >= 0 (0 = off)")
        check(0 <= self.re_prob <= 1, "re_prob", self.re_prob, "a probability in [0, 1]")
        check(0 < self.eval_crop_pct <= 1, "eval_crop_pct", self.eval_crop_pct, "a fraction in (0, 1]")
        check(self.mixup >= 0, "mixup", self.mixup, "an alpha >= 0 (0 = off)")
        check(self.cutmix >= 0, "cutmix", self.cutmix, "an alpha >= 0 (0 = off)")
        check(0 <= self.max_bad_fraction <= 1, "max_bad_fraction", self.max_bad_fraction, "a fraction in [0, 1]")
        check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "a value in [0, 1)")
