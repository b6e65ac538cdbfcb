"""Decode and augment on the training device (``data.decode_on: device``): the worker draws, the device paints.

A loader worker reads only the JPEG's header and makes every random choice of timm's DeiT training pipeline
in timm's own order and with its own code, under the per-sample seed: the random resized crop's box (from the
header's size), the flip, RandAugment's (or AutoAugment's) operations and magnitudes (timm's policy run on a
recorder: each operation notes its arguments instead of painting), and random erasing's box. It hands over the
undecoded bytes and that plan. :class:`DeviceAugment` then decodes the batch on the device
(``torchvision.io.decode_jpeg``, batched with nvJPEG on CUDA) and paints the plan with tensor operations written
from Pillow's arithmetic (its resampling, ``ImageEnhance`` blends and affine sampling), so the images are those
of the worker path up to resampling rounding (tests/datasets/test_device_augment.py measures how close).
Images that are not baseline RGB or grayscale JPEGs (PNG, CMYK JPEG) are decoded by the worker and only
painted on the device. The worker path stays the default and the reference.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor, MaybeToTensor, RandomResizedCropAndInterpolation, ToNumpy
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import equalize

from trivit.config import ConfigError
from trivit.datasets.config import DataConfig
from trivit.datasets.stream import to_mode
from trivit.datasets.transforms import erase_box, train_pipeline

OPERATIONS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
              "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x_abs", "translate_y_abs",
              "translate_x_rel", "translate_y_rel")
"""timm's augmentation functions that the device paints, by their function names; a plan stores the index."""
HEAD = 5
"""Plan columns before the operations: crop top, left, height, width, flip."""
NO_OPERATION = -1
DEVICE_FILTERS = ("bicubic", "bilinear", "nearest")
"""``data.interpolation`` values the device resamples with (torch's modes of the same names)."""


class Recorder:
    """Stands in for one of timm's augmentation functions: notes (operation, argument) instead of painting."""

    def __init__(self, name: str, notes: list[tuple[int, float]]):
        self.code, self.notes = OPERATIONS.index(name), notes

    def __call__(self, image: Any, *args: float, **kwargs: Any) -> Any:
        self.notes.append((self.code, float(args[0]) if args else 0.0))
        return image


class DrawnPolicy:
    """A copy of timm's RandAugment or AutoAugment whose operations record what they would do, drawing their
    random numbers exactly as the original (``AugmentOp.__call__`` runs unchanged up to the painting)."""

    def __init__(self, policy: RandAugment | AutoAugment):
        self.policy, self.notes = copy.deepcopy(policy), []
        ops = self.policy.ops if isinstance(policy, RandAugment) else [op for sub in self.policy.policy for op in sub]
        for op in ops:
            name = op.aug_fn.__name__
            if name not in OPERATIONS:
                raise ConfigError("data.auto_augment", f"timm's {op.name} ({name}) has no device version; use "
                                                       "data.decode_on=worker, or a policy without it")
            op.aug_fn = Recorder(name, self.notes)
        self.max_ops = policy.num_layers if isinstance(policy, RandAugment) else max(map(len, policy.policy))

    def draw(self) -> list[tuple[int, float]]:
        self.notes.clear()
        self.policy(None)
        return list(self.notes)


class EncodedImages:
    """What a loader worker makes of an encoded image with ``data.decode_on: device``:
    ``(payload, erase box, plan)``: the JPEG's bytes (1-D uint8) or, for other files, the decoded uint8 image
    (C, H, W); the erase box as :func:`erase_box`; the plan, float64 ``(HEAD + 2 x max_ops,)``."""

    takes_encoded = True

    def __init__(self, pipeline: transforms.Compose, erasing: RandomErasing | None, size: int):
        self.size, self.erasing = size, erasing
        self.crop: RandomResizedCropAndInterpolation | None = None
        self.flip, self.policy = 0.0, None
        for stage in pipeline.transforms:
            if isinstance(stage, RandomResizedCropAndInterpolation):
                self.crop = stage
            elif isinstance(stage, transforms.RandomHorizontalFlip):
                self.flip = stage.p
            elif isinstance(stage, (RandAugment, AutoAugment)):
                self.policy = DrawnPolicy(stage)
            elif not isinstance(stage, (MaybePILToTensor, MaybeToTensor, ToNumpy)):
                raise ConfigError("data.decode_on", f"the training pipeline holds {type(stage).__name__}, which has no "
                                                    "device version (supported: random resized crop, flip, RandAugment "
                                                    "or AutoAugment); use data.decode_on=worker")
        assert self.crop is not None, "timm's training pipeline begins with a random resized crop"
        self.width = HEAD + 2 * (self.policy.max_ops if self.policy else 0)

    def __call__(self, data: bytes, image: Image.Image, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        flip = self.flip > 0 and bool(torch.rand(1) < self.flip)  # torchvision's RandomHorizontalFlip draw
        operations = self.policy.draw() if self.policy else []
        box = erase_box(self.erasing, self.size, self.size)
        plan = torch.full((self.width,), float(NO_OPERATION), dtype=torch.float64)
        plan[:HEAD] = torch.tensor((top, left, height, width, float(flip)), dtype=torch.float64)
        for slot, (code, argument) in enumerate(operations):
            plan[HEAD + 2 * slot:HEAD + 2 * slot + 2] = torch.tensor((code, argument), dtype=torch.float64)
        if image.format == "JPEG" and image.mode in ("RGB", "L"):
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            payload = torch.from_numpy(np.array(to_mode(image, mode))).view(image.height, image.width, -1)
            payload = payload.permute(2, 0, 1).contiguous()
        return payload, box, plan


def device_train_transform(data: DataConfig, img_size: int) -> EncodedImages:
    """The worker's half of ``data.decode_on: device``: timm's training pipeline, drawn but not painted."""
    if data.interpolation not in DEVICE_FILTERS:
        raise ConfigError("data.interpolation", f"{data.interpolation!r} has no device version; with "
                                                f"data.decode_on=device use one of {sorted(DEVICE_FILTERS)}")
    return EncodedImages(*train_pipeline(data, img_size), img_size)


def device_augment(data: DataConfig, img_size: int, device: torch.device) -> DeviceAugment:
    """The device's half of ``data.decode_on: device``."""
    return DeviceAugment(img_size, len(data.mean), fill_levels(data.mean), data.interpolation, device)


def fill_levels(mean: Sequence[float]) -> list[int]:
    """The fill colour timm gives its augmentation operations: the mean colour in 8-bit levels."""
    return [min(255, round(255 * value)) for value in mean]


class DeviceAugment:
    """Decodes a batch's payloads on ``device`` and paints their plans: uint8 (B, channels, size, size)."""

    def __init__(self, size: int, channels: int, fill: Sequence[int], interpolation: str, device: torch.device):
        self.size, self.channels, self.device, self.interpolation = size, channels, device, interpolation
        self.fill = torch.tensor(list(fill)[:channels], dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, payloads: Sequence[torch.Tensor], plan: torch.Tensor) -> torch.Tensor:
        plan = plan.cpu().numpy()  # built by the workers: host memory, no device wait
        images = self._decoded(payloads)
        crops = [self._resized_crop(image, *map(int, row[:4])) for image, row in zip(images, plan)]
        batch = torch.stack(crops)
        flip = torch.from_numpy(plan[:, 4] > 0).to(self.device, non_blocking=True)
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        for slot in range(HEAD, plan.shape[1], 2):
            batch = self._operations(batch, plan[:, slot].astype(np.int64), plan[:, slot + 1])
        return batch.to(torch.uint8)

    def _decoded(self, payloads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The images on the device: JPEG bytes (host memory, as nvJPEG takes them) decoded there in one batched
        call, images the workers decoded copied there."""
        encoded = [index for index, payload in enumerate(payloads) if payload.dim() == 1]
        decoded = decode_jpeg([payloads[i] for i in encoded], mode=ImageReadMode.RGB, device=self.device) \
            if encoded else []
        images = dict(zip(encoded, (to_gray(image) if self.channels == 1 else image for image in decoded)))
        return [images[i] if i in images else payload.to(self.device, non_blocking=True)
                for i, payload in enumerate(payloads)]

    def _resized_crop(self, image: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """Pillow's ``resize`` of the crop (antialiased; bicubic with a = -0.5), rounded to uint8 levels, as float."""
        crop = image[None, :, top:top + height, left:left + width].to(torch.float32)
        if self.interpolation == "nearest":
            return F.interpolate(crop, size=(self.size, self.size), mode="nearest")[0]
        smooth = {"mode": self.interpolation, "antialias": True, "align_corners": False}
        rows = F.interpolate(crop, size=(height, self.size), **smooth).round_().clamp_(0, 255)  # Pillow: width first,
        return F.interpolate(rows, size=(self.size, self.size), **smooth)[0].round_().clamp_(0, 255)  # in 8 bits

    def _operations(self, batch: torch.Tensor, codes: np.ndarray, arguments: np.ndarray) -> torch.Tensor:
        """One operation slot of every image: each operation painted on the images that drew it, at once."""
        out = batch
        for code in np.unique(codes[codes != NO_OPERATION]):
            rows = np.flatnonzero(codes == code)
            index = torch.from_numpy(rows).to(self.device, non_blocking=True)
            values = torch.from_numpy(arguments[rows]).to(self.device, torch.float32, non_blocking=True)
            painted = PAINTERS[OPERATIONS[code]](self, batch[index], values.view(-1, 1, 1, 1))
            out = out.index_copy(0, index, painted)
        return out

    def affine(self, images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        """Pillow's ``Image.transform(size, AFFINE, (a, b, c, d, e, f), filter, fillcolor)``: output pixel (x, y)
        takes the input at (a x' + b y' + c, d x' + e y' + f), x' = x + 0.5 (pixel centres), and the fill
        colour where that point lies outside the image. ``matrices``: (N, 6)."""
        n, _, height, width = images.shape
        ys, xs = torch.meshgrid(torch.arange(height, device=self.device, dtype=torch.float32) + 0.5,
                                torch.arange(width, device=self.device, dtype=torch.float32) + 0.5, indexing="ij")
        a, b, c, d, e, f = (m.view(n, 1, 1) for m in matrices.unbind(dim=1))
        x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
        if self.interpolation == "bicubic":
            painted = pillow_bicubic(images, x_in, y_in)
        else:
            grid = torch.stack((x_in / width * 2 - 1, y_in / height * 2 - 1), dim=-1)
            painted = F.grid_sample(images, grid, mode=self.interpolation, padding_mode="border", align_corners=False)
        inside = ((x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height))[:, None]
        return torch.where(inside, painted.clamp(0, 255).trunc(), self.fill)


def pillow_bicubic(images: torch.Tensor, x_in: torch.Tensor, y_in: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic sampling of its geometric transforms (Geometry.c: the cubic with a = -1 on the 4 x 4
    pixels around the point, edges repeated) at points ``x_in, y_in`` (N, H, W) of float images (N, C, H, W)."""
    n, channels, height, width = images.shape
    x, y = x_in - 0.5, y_in - 0.5
    x0, y0 = x.floor(), y.floor()
    dx, dy = (x - x0)[:, None], (y - y0)[:, None]
    flat = images.flatten(2)

    def cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (v2 - v1 - v3 + v4)))

    columns = [(x0 + k).clamp(0, width - 1).long() for k in (-1, 0, 1, 2)]
    rows = []
    for k in (-1, 0, 1, 2):
        row = (y0 + k).clamp(0, height - 1).long() * width
        taps = [flat.gather(2, (row + column).view(n, 1, -1).expand(n, channels, -1)).view(n, channels, *x.shape[1:])
                for column in columns]
        rows.append(cubic(*taps, dx))
    return cubic(*rows, dy)


def to_gray(image: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB to L: (R 19595 + G 38470 + B 7471 + 2^15) >> 16, on uint8 (3, H, W) -> (1, H, W)."""
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=image.device).view(3, 1, 1)
    return ((image.to(torch.int32) * weights).sum(dim=0, keepdim=True) + 32768).bitwise_right_shift(16).to(torch.uint8)


def gray_levels(images: torch.Tensor) -> torch.Tensor:
    """Pillow's L levels of float (N, C, H, W) images holding uint8 values (C = 3: its integer formula)."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor([19595.0, 38470.0, 7471.0], device=images.device).view(1, 3, 1, 1)
    return torch.floor(((images * weights).sum(dim=1, keepdim=True) + 32768) / 65536)


def blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, image, factor)`` on 8-bit images: truncated, clipped."""
    return (degenerate + factor * (images - degenerate)).clamp(0, 255).trunc()


def paint_auto_contrast(augment: DeviceAugment, images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast``: each channel stretched from its lowest to its highest level, by Pillow's table."""
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (high - low).clamp(min=1)
    stretched = (images * scale - low * scale).clamp(0, 255).trunc()
    return torch.where(high > low, stretched, images)


def paint_equalize(augment: DeviceAugment, images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return equalize(images.to(torch.uint8)).to(torch.float32)  # torchvision's tensor version of Pillow's


def paint_invert(augment: DeviceAugment, images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return 255 - images


def paint_posterize(augment: DeviceAugment, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    keep = bits.clamp(max=8).to(torch.int32)
    mask = (255 - (2 ** (8 - keep) - 1)).to(torch.int32)  # timm keeps 8 bits as they are
    return (images.to(torch.int32) & mask).to(torch.float32)


def paint_solarize(augment: DeviceAugment, images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(images < threshold, images, 255 - images)


def paint_solarize_add(augment: DeviceAugment, images: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    return torch.where(images < 128, (images + add).clamp(max=255), images)  # timm's threshold 128


def paint_color(augment: DeviceAugment, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(gray_levels(images).expand_as(images), images, factor)


def paint_contrast(augment: DeviceAugment, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = torch.floor(gray_levels(images).mean(dim=(1, 2, 3), keepdim=True) + 0.5)  # int(mean + 0.5)
    return blend(mean.expand_as(images), images, factor)


def paint_brightness(augment: DeviceAugment, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(torch.zeros_like(images), images, factor)


def paint_sharpness(augment: DeviceAugment, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blended with Pillow's SMOOTH filter (3x3, centre 5, others 1, / 13, rounded; the border kept)."""
    channels = images.shape[1]
    kernel = torch.ones(channels, 1, 3, 3, device=images.device)
    kernel[:, :, 1, 1] = 5
    smooth = torch.floor(F.conv2d(images, kernel / 13, groups=channels) + 0.5).clamp(0, 255)
    degenerate = images.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return blend(degenerate, images, factor)


def paint_rotate(augment: DeviceAugment, images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Pillow's ``rotate`` about the centre (angles multiple of 360: unchanged)."""
    height, width = images.shape[-2:]
    angle = -torch.deg2rad(degrees.view(-1).double() % 360)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    matrices = torch.stack((cos, sin, c, -sin, cos, f), dim=1).to(torch.float32)
    still = (degrees.view(-1) % 360 == 0).view(-1, 1, 1, 1)
    return torch.where(still, images, augment.affine(images, matrices))


def _affine_of(columns: Callable[[torch.Tensor, int, int], tuple]) -> Callable:
    def paint(augment: DeviceAugment, images: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        v = values.view(-1)
        one, zero = torch.ones_like(v), torch.zeros_like(v)
        height, width = images.shape[-2:]
        matrices = torch.stack(columns(v, one, zero, width, height), dim=1)
        return augment.affine(images, matrices)
    return paint


PAINTERS: dict[str, Callable[[DeviceAugment, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "auto_contrast": paint_auto_contrast,
    "equalize": paint_equalize,
    "invert": paint_invert,
    "rotate": paint_rotate,
    "posterize": paint_posterize,
    "solarize": paint_solarize,
    "solarize_add": paint_solarize_add,
    "color": paint_color,
    "contrast": paint_contrast,
    "brightness": paint_brightness,
    "sharpness": paint_sharpness,
    "shear_x": _affine_of(lambda v, one, zero, w, h: (one, v, zero, zero, one, zero)),
    "shear_y": _affine_of(lambda v, one, zero, w, h: (one, zero, zero, v, one, zero)),
    "translate_x_abs": _affine_of(lambda v, one, zero, w, h: (one, zero, v, zero, one, zero)),
    "translate_y_abs": _affine_of(lambda v, one, zero, w, h: (one, zero, zero, zero, one, v)),
    "translate_x_rel": _affine_of(lambda v, one, zero, w, h: (one, zero, v * w, zero, one, zero)),
    "translate_y_rel": _affine_of(lambda v, one, zero, w, h: (one, zero, zero, zero, one, v * h)),
}
"""Each of :data:`OPERATIONS` on float (N, C, H, W) images of uint8 levels, with per-image arguments (N, 1, 1, 1)."""
