"""Unlearnable shards (CUDA, CVPR 2023): every training image blurred by its class's private filter.

From a private key, each class gets one ``kernel`` x ``kernel`` filter whose entries are drawn
U(0, ``blur``) and one randomly chosen entry set to 1.0 (``shared``: one filter for every class,
the paper's control). An image, pixels in [0, 1], is filtered channel by channel with its class's
filter (a depthwise cross-correlation, as ``torch.nn.functional.conv2d`` computes it, zero
"same" padding); each filtered image is then divided by its own maximum (the authors' code,
``final_filter_unlearnable.py``: ``img / img.max()``), scaled to 0..255, clipped and truncated to 8
bits, and stored as PNG (lossless: JPEG would blur the shortcut away). A maximum over the whole
split would instead keep each image's brightness proportional to its class filter's sum: a
per-class brightness shortcut the method does not have. ``fraction`` < 1 filters exactly
round(fraction x N) images, chosen by the key (the code filters each image with probability
``mix``: the same share in expectation, but not reproducible from the key), and leaves the others
as they are. A network trained on such shards learns the filter-to-label shortcut rather than
the content. The key is never written anywhere; the index records the other settings.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class UnlearnableSpec:
    """The private key and the settings of CUDA's filters (``trivit shards --unlearnable``)."""

    key: str
    kernel: int = 3
    blur: float = 0.3
    fraction: float = 1.0
    shared: bool = False

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("--unlearnable needs a private key: any text, kept secret (it is never written)")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"--kernel must be an odd positive size (the filter is centred), got {self.kernel}")
        if not 0 < self.blur <= 1:
            raise ValueError(f"--blur must lie in (0, 1] (the filter's random entries are U(0, blur)), got {self.blur}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must lie in (0, 1], got {self.fraction}")

    def record(self) -> dict[str, Any]:
        """What the index records: every setting but the key."""
        return {"method": "CUDA", "kernel": self.kernel, "blur": self.blur, "fraction": self.fraction,
                "shared": self.shared, "scale": "per image"}

    def rng(self, purpose: str) -> np.random.Generator:
        """A generator drawn from the key alone (one per purpose, so that they do not share draws)."""
        digest = hashlib.sha256(f"{purpose}:{self.key}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def filters(self, num_classes: int) -> np.ndarray:
        """(num_classes, kernel, kernel) float64: each class's filter (the same one for all when shared)."""
        rng = self.rng("filters")
        count = 1 if self.shared else num_classes
        filters = rng.uniform(0.0, self.blur, size=(count, self.kernel, self.kernel))
        for f in filters:
            f.flat[rng.integers(self.kernel * self.kernel)] = 1.0
        return np.repeat(filters, num_classes, axis=0) if self.shared else filters

    def chosen(self, num_samples: int) -> np.ndarray:
        """Which of ``num_samples`` samples (by sample id) are filtered: a key-chosen ``fraction`` of them."""
        chosen = np.zeros(num_samples, dtype=bool)
        chosen[self.rng("fraction").permutation(num_samples)[:round(self.fraction * num_samples)]] = True
        return chosen


def filtered(pixels: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``pixels`` (H, W) or (H, W, C), uint8, filtered by ``kernel`` on every channel: float64 in [0, sum(kernel)]."""
    image = pixels.astype(np.float64) / 255.0
    planar = image[..., None] if image.ndim == 2 else image
    size = kernel.shape[0]
    pad = size // 2
    padded = np.pad(planar, ((pad, pad), (pad, pad), (0, 0)))
    height, width = planar.shape[:2]
    out = np.zeros_like(planar)
    for i in range(size):
        for j in range(size):
            out += kernel[i, j] * padded[i:i + height, j:j + width]
    return out[..., 0] if image.ndim == 2 else out


def to_bytes(values: np.ndarray, image_axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Filtered values divided by their image's maximum, scaled to 0..255, clipped and truncated to uint8.

    ``image_axes``: the axes of one image (default: all, ``values`` is one image); the other axes index
    images, each scaled by its own maximum. An all-black image stays black."""
    peak = values.max(axis=image_axes, keepdims=True)
    scaled = np.divide(values, peak, out=np.zeros_like(values), where=peak > 0) * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """An encoded image as uint8 pixels: grayscale stays one channel (16-bit scaled to 8), anything else RGB."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            return (np.asarray(image, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
        return np.asarray(image.convert("L" if image.mode in ("L", "1") else "RGB"))


@dataclass(frozen=True)
class SplitFilter:
    """What a shard writer needs to filter a split: the class filters and the chosen sample ids."""

    filters: np.ndarray
    chosen: np.ndarray

    def encode(self, sample_id: int, label: int, data: bytes) -> bytes | None:
        """The sample's filtered PNG, or None where it is not chosen (it keeps its own bytes)."""
        if not self.chosen[sample_id]:
            return None
        return png_bytes(to_bytes(filtered(decoded(data), self.filters[label])))
