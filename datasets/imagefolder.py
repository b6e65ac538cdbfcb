"""ImageFolder trees (one folder per class, ImageNet's train/val layout) written as trivit shards.

Files keep their encoded bytes (a JPEG stays the same JPEG). Every file is decoded once before
anything is written; unreadable ones are reported by path and left out. The sample order is
a seeded shuffle of the sorted file list (shards must be pre-shuffled: a reader's shuffle buffer
only mixes nearby samples), sample ids are positions in that order, and shards are cut by
count or by size from that order, so the same tree gives byte-identical shards.
"""
from __future__ import annotations

import io
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from trivit.datasets.shards import split_entry, write_index, write_shard
from trivit.datasets.unlearnable import SplitFilter, UnlearnableSpec

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class ImageFile:
    path: str
    label: int


def find_splits(root: Path) -> dict[str, Path]:
    """``{'train': root/train, 'val': root/val}`` for a tree with split folders, else ``{'train': root}``."""
    splits = {name: root / name for name in SPLIT_NAMES if (root / name).is_dir()}
    return splits or {"train": root}


def class_names(split_root: Path) -> list[str]:
    names = sorted(p.name for p in split_root.iterdir() if p.is_dir())
    if not names:
        raise FileNotFoundError(f"{split_root} has no class folders: expected an ImageFolder tree "
                                "(one folder of images per class, optionally under train/ and val/)")
    return names


def list_images(split_root: Path, classes: list[str]) -> tuple[list[ImageFile], list[tuple[str, str]]]:
    """Every image file of the split, sorted by class then path, and the (path, reason) of what is left out:
    files trivit does not read and class folders the training split does not have."""
    files, left_out = [], []
    for label, name in enumerate(classes):
        folder = split_root / name
        if folder.is_dir():
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(ImageFile(str(path), label))
                else:
                    left_out.append((str(path), f"not a {'/'.join(sorted(IMAGE_SUFFIXES))} file: convert it to PNG "
                                                "or JPEG to include it"))
    for folder in sorted(p for p in split_root.iterdir() if p.is_dir() and p.name not in classes):
        count = sum(1 for p in folder.rglob("*") if p.is_file())
        left_out.append((str(folder), f"class folder not in the training split ({count} files left out, they would "
                                      "have no label): add the class to train/ or remove the folder"))
    return files, left_out


def check_image(path: str) -> str | None:
    """None if the file decodes completely, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.load()
        return None
    except Exception as error:  # noqa: BLE001 - any decoder failure means the file is unusable
        return f"{type(error).__name__}: {error}"


def plan_shards(files: list[ImageFile], samples_per_shard: int | None, max_shard_bytes: int | None) -> list[list[int]]:
    """Cut positions 0..len(files)-1 into shards of at most N samples or B bytes of image data."""
    shards: list[list[int]] = [[]]
    size = 0
    for position, file in enumerate(files):
        nbytes = Path(file.path).stat().st_size
        full = (samples_per_shard is not None and len(shards[-1]) >= samples_per_shard) or (
            max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes)
        if full:
            shards.append([])
            size = 0
        shards[-1].append(position)
        size += nbytes
    return shards if shards[0] else []


def shard_samples(files: list[tuple[int, ImageFile]], cuda: SplitFilter | None = None,
                  max_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Shard samples of ``(sample id, file)`` pairs: the file's own bytes (shrunk to ``max_size``, see
    :func:`shrunk`; or, ``cuda``, its filtered PNG), its class, its id."""
    for sample_id, file in files:
        suffix = IMAGE_SUFFIXES[Path(file.path).suffix.lower()]
        data = Path(file.path).read_bytes()
        if max_size is not None:
            suffix, data = shrunk(suffix, data, max_size)
        protected = cuda.encode(sample_id, file.label, data) if cuda is not None else None
        image = {"png": protected} if protected is not None else {suffix: data}
        yield {"__key__": f"{sample_id:09d}", **image, "cls": file.label, "id": sample_id}


SHRUNK_JPEG_QUALITY = 95


def shrunk(suffix: str, data: bytes, max_size: int) -> tuple[str, bytes]:
    """An image whose shorter side exceeds ``max_size`` px, resized (bicubic, aspect kept) so that it is
    ``max_size``: a JPEG stays a JPEG (quality 95), anything else becomes a PNG (lossless). Smaller
    images keep their bytes."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if min(width, height) <= max_size:
            return suffix, data
        scale = max_size / min(width, height)
        size = (max(max_size, round(width * scale)), max(max_size, round(height * scale)))
        jpeg = suffix == "jpg"
        if jpeg:
            image.draft(image.mode, size)  # decode at the largest power-of-2 reduction still >= size
        resized = image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG" if jpeg else "PNG", **({"quality": SHRUNK_JPEG_QUALITY} if jpeg else {}))
    return ("jpg" if jpeg else "png"), buffer.getvalue()


def _write_one(job: tuple[Path, list[tuple[int, ImageFile]], SplitFilter | None, int | None]) -> int:
    path, files, cuda, max_size = job
    return write_shard(path, shard_samples(files, cuda, max_size))




def check_output_folder(root: Path, dest: Path) -> None:
    """Shards written inside the image tree would become an extra class of it on the next run."""
    root, dest = root.resolve(), dest.expanduser().resolve()
    if dest == root or root in dest.parents:
        raise ValueError(f"the output folder {dest} is inside the image tree {root}: its shards would become an "
                         "extra class on the next run; write them outside the tree")


def write_imagefolder(root: Path, dest: Path, *, samples_per_shard: int | None = None,
                      max_shard_bytes: int | None = None, workers: int = 1, seed: int = 0,
                      progress: bool = True, unlearnable: UnlearnableSpec | None = None,
                      max_size: int | None = None) -> tuple[dict, list[tuple[str, str]]]:
    """Write every split of ``root`` to ``dest``; returns the index and the (path, reason) of skipped files.

    Every split is listed and every image checked before anything is written: a split that would
    hold no sample stops the command with the reasons, and an existing index is never replaced
    by an empty one. ``unlearnable`` filters the training split (datasets/unlearnable.py). ``max_size``
    stores each image with its shorter side at most that many pixels (:func:`shrunk`; before filtering).
    """
    if samples_per_shard is None and max_shard_bytes is None:
        samples_per_shard = 1000
    for name, value in (("samples_per_shard", samples_per_shard), ("max_shard_bytes", max_shard_bytes),
                        ("max_size", max_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    root, dest = root.resolve(), dest.resolve()
    check_output_folder(root, dest)
    splits = find_splits(root)
    if unlearnable is not None and "train" not in splits:
        raise ValueError(f"--unlearnable filters the training split, and {root} has none (only "
                         f"{', '.join(splits)}): put the images to protect under train/")
    classes = class_names(splits.get("train", next(iter(splits.values()))))
    checked, skipped = {}, []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for split, split_root in splits.items():
            files, left_out = list_images(split_root, classes)
            reasons = list(tqdm(pool.map(check_image, [f.path for f in files], chunksize=64), total=len(files),
                                desc=f"check {split}", disable=not progress))
            skipped += left_out + [(f.path, r) for f, r in zip(files, reasons) if r is not None]
            checked[split] = [f for f, r in zip(files, reasons) if r is None]
            if not checked[split]:
                raise ValueError(f"{split_root} holds no readable image in the class folders of the training split "
                                 f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): nothing was "
                                 f"written. Left out: {'; '.join(f'{p}: {r}' for p, r in left_out[:3]) or 'nothing'}")
        dest.mkdir(parents=True, exist_ok=True)
        index = {}
        for split, good in checked.items():
            random.Random(seed).shuffle(good)
            plan = plan_shards(good, samples_per_shard, max_shard_bytes)
            names = [f"{split}-{number:06d}.tar" for number in range(len(plan))]
            cuda = SplitFilter(unlearnable.filters(len(classes)), unlearnable.chosen(len(good))) if (
                unlearnable is not None and split == "train") else None
            jobs = [(dest / name, [(p, good[p]) for p in positions], cuda, max_size)
                    for name, positions in zip(names, plan)]
            counts = list(tqdm(pool.map(_write_one, jobs), total=len(jobs), desc=f"write {split}",
                               disable=not progress))
            index[split] = split_entry(names, counts)
            if max_size is not None:
                index[split]["max_size"] = max_size
            if cuda is not None:
                index[split]["unlearnable"] = unlearnable.record()
    write_index(dest, index, classes)
    return index, skipped
