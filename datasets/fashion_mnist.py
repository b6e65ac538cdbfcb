"""Fashion-MNIST (Debian package ``dataset-fashion-mnist``) converted into trivit shards.

The IDX files are read as they ship; every image is stored as a PNG with its label and a
global sample id (train 0..59999, test 0..9999), so the demo trains through the same
WebDataset path as an ImageNet run.
"""
from __future__ import annotations

import gzip
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from trivit.datasets.shards import INDEX_NAME, write_index, write_split
from trivit.datasets.unlearnable import UnlearnableSpec, filtered, to_bytes

PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
SPLIT_FILES = {"train": "train", "test": "t10k"}
SAMPLES_PER_SHARD = 5000
INSTALL_HINT = "install it with: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: big-endian magic (0, 0, dtype code, ndim), dims, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values (truncated file?)")
    return data.reshape(dims)


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of ``split`` ('train' or 'test')."""
    stem = SPLIT_FILES[split]
    paths = [root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-labels-idx1-ubyte.gz"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files missing: {', '.join(missing)}; {INSTALL_HINT}")
    images, labels = (read_idx(p) for p in paths)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def samples(images: np.ndarray, labels: np.ndarray) -> Iterator[dict[str, Any]]:
    """Shard samples: PNG bytes, class index and the sample id (the position in the split)."""
    for sample_id, (image, label) in enumerate(zip(images, labels)):
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        yield {"__key__": f"{sample_id:08d}", "png": buffer.getvalue(), "cls": int(label), "id": sample_id}


def write_shards(dest: Path, root: Path = PACKAGE_DIR, samples_per_shard: int = SAMPLES_PER_SHARD,
                 unlearnable: UnlearnableSpec | None = None) -> dict:
    """Write both splits and the index into ``dest``; returns the index's splits. ``unlearnable``
    filters the training split (CUDA, datasets/unlearnable.py); the test split stays clean."""
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found at {root}; {INSTALL_HINT}")
    splits = {}
    for split in SPLIT_FILES:
        images, labels = load_split(root, split)
        record = None
        if unlearnable is not None and split == "train":
            images, record = unlearnable_images(images, labels, unlearnable)
        splits[split] = write_split(samples(images, labels), dest, split, samples_per_shard)
        if record is not None:
            splits[split]["unlearnable"] = record
    write_index(dest, splits, CLASSES)
    return splits


def unlearnable_images(images: np.ndarray, labels: np.ndarray, spec: UnlearnableSpec) -> tuple[np.ndarray, dict]:
    """The key-chosen images filtered by their class's filter, and what the index records of it."""
    filters, chosen = spec.filters(len(CLASSES)), spec.chosen(len(images))
    values = {}
    for label in range(len(CLASSES)):
        picked = np.flatnonzero(chosen & (labels == label))
        if len(picked):  # the images as channels of one (H, W, N) array: one pass per class
            values[label] = (picked, filtered(images[picked].transpose(1, 2, 0), filters[label]))
    out = images.copy()
    for picked, value in values.values():
        out[picked] = to_bytes(value, image_axes=(0, 1)).transpose(2, 0, 1)
    return out, spec.record()


def prepare(cache_dir: str | Path, root: Path = PACKAGE_DIR, samples_per_shard: int = SAMPLES_PER_SHARD) -> Path:
    """Convert Fashion-MNIST to shards under ``cache_dir/fashion-mnist`` once; return that folder.

    The shards are written into a temporary folder that is renamed into place when complete,
    so an interrupted conversion is never mistaken for a finished one.
    """
    dest = Path(cache_dir).expanduser() / "fashion-mnist"
    if (dest / INDEX_NAME).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fashion-mnist-", dir=dest.parent))
    try:
        write_shards(tmp, root, samples_per_shard)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
