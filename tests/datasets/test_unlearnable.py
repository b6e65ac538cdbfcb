"""Unlearnable shards (CUDA): the filters from the key, the transform against float64 loops, and the shards
written from an ImageFolder tree (test split untouched, the key nowhere, any number of workers)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from trivit.cli import main
from trivit.datasets.fashion_mnist import unlearnable_images
from trivit.datasets.imagefolder import write_imagefolder
from trivit.datasets.shards import read_index
from trivit.datasets.unlearnable import UnlearnableSpec, filtered, to_bytes

KEY = "a private key"


def loop_filter(pixels: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The paper's filtering written out: pixels / 255, zero padding, cross-correlation per channel."""
    image = pixels.astype(np.float64) / 255.0
    image = image[..., None] if image.ndim == 2 else image
    height, width, channels = image.shape
    half = kernel.shape[0] // 2
    out = np.zeros_like(image)
    for y in range(height):
        for x in range(width):
            for c in range(channels):
                total = 0.0
                for i in range(kernel.shape[0]):
                    for j in range(kernel.shape[1]):
                        yy, xx = y + i - half, x + j - half
                        if 0 <= yy < height and 0 <= xx < width:
                            total += kernel[i, j] * image[yy, xx, c]
                out[y, x, c] = total
    return out[..., 0] if pixels.ndim == 2 else out


def test_the_filters_come_from_the_key_alone_with_the_papers_properties():
    spec = UnlearnableSpec(KEY, kernel=3, blur=0.3)
    filters = spec.filters(10)
    assert filters.shape == (10, 3, 3)
    assert np.array_equal(filters, UnlearnableSpec(KEY).filters(10))
    assert not np.allclose(filters, UnlearnableSpec("another key").filters(10))
    for f in filters:
        assert np.count_nonzero(f == 1.0) == 1
        rest = f[f != 1.0]
        assert rest.min() >= 0 and rest.max() < 0.3
    assert len({f.tobytes() for f in filters}) == 10
    shared = UnlearnableSpec(KEY, shared=True).filters(10)
    assert all(np.array_equal(f, shared[0]) for f in shared)
    assert UnlearnableSpec(KEY, kernel=9, blur=0.06).filters(2).shape == (2, 9, 9)
    chosen = UnlearnableSpec(KEY, fraction=0.3).chosen(100)
    assert chosen.sum() == 30 and np.array_equal(chosen, UnlearnableSpec(KEY, fraction=0.3).chosen(100))
    for bad, match in (({"key": ""}, "private key"), ({"key": KEY, "kernel": 4}, "odd"),
                       ({"key": KEY, "blur": 0}, "blur"), ({"key": KEY, "fraction": 1.5}, "fraction")):
        with pytest.raises(ValueError, match=match):
            UnlearnableSpec(**bad)


def authors_bytes(values: np.ndarray) -> np.ndarray:
    """The authors' code on one filtered image (pixels in [0, 1]): img / img.max(), x 255, clipped, cast to uint8."""
    return np.floor(np.clip(values / values.max() * 255.0, 0, 255)).astype(np.uint8)


def test_the_transform_of_a_hand_sized_image_equals_float64_loops():
    rng = np.random.default_rng(1)
    kernel = UnlearnableSpec(KEY).filters(3)[1]
    gray = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    colour = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    for pixels in (gray, colour):
        expected = loop_filter(pixels, kernel)
        np.testing.assert_allclose(filtered(pixels, kernel), expected, rtol=0, atol=1e-12)
    values = loop_filter(gray, kernel)
    assert np.array_equal(to_bytes(values), authors_bytes(values))
    assert np.array_equal(to_bytes(np.zeros((3, 3))), np.zeros((3, 3))), "an all-black image stays black"
    corner = sum(kernel[i, j] * gray[i - 1, j - 1] / 255 for i in (1, 2) for j in (1, 2))  # zero padding at (0, 0)
    assert filtered(gray, kernel)[0, 0] == pytest.approx(corner, abs=1e-12)


def test_fashion_mnist_images_of_the_chosen_fraction_are_filtered_by_their_class(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8)
    labels = np.arange(40) % 10
    spec = UnlearnableSpec(KEY, fraction=0.5)
    out, record = unlearnable_images(images, labels, spec)
    chosen, filters = spec.chosen(40), spec.filters(10)
    values = {i: loop_filter(images[i], filters[labels[i]]) for i in np.flatnonzero(chosen)}
    assert record == {"method": "CUDA", "kernel": 3, "blur": 0.3, "fraction": 0.5, "shared": False,
                      "scale": "per image"}
    assert chosen.sum() == 20, "exactly round(fraction x N) images, chosen by the key"
    for i in range(40):
        expected = authors_bytes(values[i]) if chosen[i] else images[i]
        assert np.array_equal(out[i], expected), i


def test_each_filtered_image_is_scaled_by_its_own_maximum_so_brightness_does_not_follow_the_class():
    """A maximum over the split would make each image's brightness its class filter's sum (a per-class
    shortcut); per image, as the authors' code, the same image under any class's filter peaks at 255."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    filters = UnlearnableSpec(KEY).filters(10)
    assert filters.sum(axis=(1, 2)).std() > 0.1, "the class filters' sums differ"
    peaks = {int(unlearnable_images(image[None], np.array([label]), UnlearnableSpec(KEY))[0].max())
             for label in range(10)}
    assert peaks == {255}


def samples_of(dest, split):
    index = read_index(dest / "index.json")
    return [sample for shard in index["splits"][split]["shards"]
            for sample in wds.DataPipeline(wds.SimpleShardList([str(dest / shard)]), wds.tarfile_to_samples())]


def test_imagefolder_shards_unlearnable_for_training_only_byte_identical_for_any_workers(image_tree, tmp_path):
    clean, one, two = tmp_path / "clean", tmp_path / "one", tmp_path / "two"
    write_imagefolder(image_tree, clean, samples_per_shard=10, progress=False)
    spec = UnlearnableSpec(KEY)
    write_imagefolder(image_tree, one, samples_per_shard=10, progress=False, unlearnable=spec)
    assert main(["shards", str(image_tree), str(two), "--samples-per-shard", "10", "--workers", "2", "--quiet",
                 "--unlearnable", KEY]) == 0
    index = read_index(one / "index.json")
    for split in ("train", "val"):
        for name in index["splits"][split]["shards"]:
            assert (one / name).read_bytes() == (two / name).read_bytes(), f"{name} depends on --workers"
    for name in index["splits"]["val"]["shards"]:
        assert (one / name).read_bytes() == (clean / name).read_bytes(), "the validation split is untouched"
    record = index["splits"]["train"]["unlearnable"]
    assert record["kernel"] == 3 and record["blur"] == 0.3 and "key" not in record
    for path in one.iterdir():
        assert KEY.encode() not in path.read_bytes(), f"the key is written in {path.name}"
    filters = spec.filters(3)
    clean_train = {s["__key__"]: s for s in samples_of(clean, "train")}
    protected = samples_of(one, "train")
    assert len(protected) == len(clean_train)
    for sample in protected[:6]:
        source = clean_train[sample["__key__"]]
        original = np.asarray(Image.open(io.BytesIO(source.get("png") or source["jpg"])).convert("RGB"))
        label = int(sample["cls"])
        expected = authors_bytes(loop_filter(original, filters[label]))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), expected)
    shared = tmp_path / "shared"
    assert main(["shards", str(image_tree), str(shared), "--quiet", "--unlearnable-shared", KEY]) == 0
    assert read_index(shared / "index.json")["splits"]["train"]["unlearnable"]["shared"] is True
