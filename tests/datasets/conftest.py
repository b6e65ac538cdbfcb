"""Fixtures of the dataset tests."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory):
    """train/ with 3 classes x 12 JPEGs/PNGs of different sizes, val/ with 3 x 4; one corrupt and one truncated file."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 4)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20 + i, 30 + 2 * i, 3), dtype=np.uint8)
                pixels[..., label] = 255
                fmt, suffix = ("PNG", "png") if i % 4 == 0 else ("JPEG", "jpg")
                Image.fromarray(pixels).save(folder / f"img{i:02d}.{suffix}", format=fmt)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    good = (root / "train" / "fox" / "img01.jpg").read_bytes()
    (root / "train" / "fox" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "cat" / "notes.txt").write_text("left out and listed: not an image suffix")
    return root
