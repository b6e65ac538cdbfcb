"""Fashion-MNIST: the IDX reader on hand-made files, and the shard round trip of the real data."""
from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from trivit.datasets import fashion_mnist
from trivit.datasets.shards import read_index


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_on_a_hand_made_file(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", images)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "x.gz"), images)


def test_read_idx_rejects_a_truncated_file(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((2, 3, 4), dtype=np.uint8))
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "y.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(tmp_path / "y.gz")


def test_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist.prepare(tmp_path / "cache", root=tmp_path / "absent")


def test_shards_round_trip_small_split(tmp_path):
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    data = {}
    for split, stem, count in (("train", "train", 23), ("test", "t10k", 7)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
        data[split] = (images, labels)
    folder = fashion_mnist.prepare(tmp_path / "cache", root=root, samples_per_shard=10)
    index = read_index(folder / "index.json")
    assert index["splits"]["train"]["counts"] == [10, 10, 3]
    assert index["splits"]["train"]["urls"] == "train-{000000..000002}.tar"
    assert index["splits"]["test"]["counts"] == [7]
    for split, (images, labels) in data.items():
        assert_round_trip(folder, index["splits"][split], images, labels)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".fashion-mnist-")], "temp folder left behind"


def assert_round_trip(folder, split_index, images, labels):
    seen = np.zeros(len(images), dtype=int)
    for shard in split_index["shards"]:
        for sample in wds.DataPipeline(wds.SimpleShardList([str(folder / shard)]), wds.tarfile_to_samples()):
            sample_id = int(sample["id"])
            seen[sample_id] += 1
            assert int(sample["cls"]) == labels[sample_id]
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), images[sample_id])
    assert (seen == 1).all(), "every sample exactly once"


def test_shards_are_byte_identical_when_rewritten(tmp_path):
    from tests.conftest import synthetic_samples
    from trivit.datasets.shards import write_split
    write_split(synthetic_samples(40), tmp_path / "a", "train", 16)
    write_split(synthetic_samples(40), tmp_path / "b", "train", 16)
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        with tarfile.open(tmp_path / "a" / name) as tar:
            assert all(member.mtime == 0 for member in tar.getmembers())


@pytest.mark.distributed
@pytest.mark.skipif(not fashion_mnist.PACKAGE_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_two_ranks_prepare_the_demo_data_once_and_it_round_trips(tmp_path):
    """torchrun with 2 ranks and an empty cache: one rank writes the shards while the other waits; the shards
    hold every real image and label exactly once, pixel for pixel."""
    import os
    import subprocess

    from tests.launchers import ROOT, free_port, launcher

    cache = tmp_path / "cache"
    command = launcher("torchrun", free_port()) + [
        "train", "--config", str(ROOT / "configs" / "demo.yaml"), "--dry-run", "engine.backend=ddp",
        f"data.cache_dir={cache}", f"run_dir={tmp_path / 'run'}"]
    for _ in range(2):  # a second try only after gloo's teardown abort (pytorch/pytorch#190489), nothing else
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
        if result.returncode == 0 or "terminate called without an active exception" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    assert "config valid; backend ddp on 2 process(es)" in result.stdout
    index = read_index(cache / "fashion-mnist" / "index.json")
    assert index["splits"]["train"]["total"] == 60000
    assert sorted(p.name for p in cache.iterdir()) == [".fashion-mnist.lock", "fashion-mnist"], "no temp folder left"
    assert index["splits"]["test"]["total"] == 10000 and len(index["classes"]) == 10
    for split in ("train", "test"):
        images, labels = fashion_mnist.load_split(fashion_mnist.PACKAGE_DIR, split)
        assert_round_trip(cache / "fashion-mnist", index["splits"][split], images, labels)
