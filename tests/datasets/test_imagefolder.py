"""ImageFolder -> shards -> reader: every sample once, original bytes, right label and id."""
from __future__ import annotations

import io
import subprocess
import sys
from collections import Counter

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from tests.datasets.conftest import CLASSES
from trivit.datasets.config import DataConfig
from trivit.datasets.imagefolder import write_imagefolder
from trivit.datasets.loaders import train_loader
from trivit.datasets.shards import read_index
from trivit.datasets.stream import SampleDecoder, StreamLayout, expand_urls
from trivit.datasets.transforms import eval_transform


def read_all(dest, split):
    index = read_index(dest / "index.json")
    samples = []
    for shard in index["splits"][split]["shards"]:
        samples.extend(wds.DataPipeline(wds.SimpleShardList([str(dest / shard)]), wds.tarfile_to_samples()))
    return index, samples


def test_round_trip_keeps_bytes_labels_and_reports_bad_files(image_tree, tmp_path):
    dest = tmp_path / "shards"
    index, skipped = write_imagefolder(image_tree, dest, samples_per_shard=5, workers=2, progress=False)
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in skipped) == ["broken.jpg", "notes.txt", "truncated.jpg"]
    assert index["train"]["total"] == 36 and index["train"]["counts"] == [5] * 7 + [1]
    assert index["val"]["total"] == 12
    read, samples = read_all(dest, "train")
    assert read["classes"] == CLASSES
    assert sorted(int(s["id"]) for s in samples) == list(range(36))
    originals = {}
    for label, name in enumerate(CLASSES):
        for path in sorted((image_tree / "train" / name).glob("img*")):
            originals[path.read_bytes()] = label
    for sample in samples:
        data = sample.get("jpg", sample.get("png"))
        assert originals[data] == int(sample["cls"]), "original bytes, right class"
        with Image.open(io.BytesIO(data)) as image:
            assert np.asarray(image.convert("RGB")).mean((0, 1)).argmax() == int(sample["cls"])


def test_writer_is_deterministic_whatever_the_worker_count(image_tree, tmp_path):
    write_imagefolder(image_tree, tmp_path / "a", samples_per_shard=7, workers=1, progress=False)
    write_imagefolder(image_tree, tmp_path / "b", samples_per_shard=7, workers=3, progress=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_max_shard_bytes_cuts_by_size(image_tree, tmp_path):
    index, _ = write_imagefolder(image_tree, tmp_path / "s", max_shard_bytes=6000, progress=False)
    sizes = [sum(len(s.get("jpg", s.get("png"))) for s in read_all(tmp_path / "s", "train")[1]
                 if s["__url__"].endswith(name)) for name in index["train"]["shards"]]
    assert len(sizes) == len(index["train"]["counts"]) > 3
    assert all(size <= 6000 for size, count in zip(sizes, index["train"]["counts"]) if count > 1), \
        "a shard exceeds the limit only when one image alone does"


def test_reader_yields_every_sample_once_across_two_ranks_and_two_workers(image_tree, tmp_path):
    dest = tmp_path / "shards"
    write_imagefolder(image_tree, dest, samples_per_shard=3, progress=False)  # 12 train shards
    urls = expand_urls(str(dest / "train-{000000..000011}.tar"))
    decode = SampleDecoder(eval_transform(DataConfig(eval_crop_pct=1.0), 16), "RGB")
    ids, labels = [], []
    for rank in (0, 1):
        layout = StreamLayout.for_rank(tuple(urls), seed=0, epoch=0, rank=rank, world_size=2, num_workers=2)
        for _, batch_labels, batch_ids, *_ in train_loader(layout, decode, batch_size=3, start=0, stop=6,
                                                       shuffle_buffer=4, num_workers=2):
            ids += batch_ids.tolist()
            labels += batch_labels.tolist()
    assert Counter(ids) == Counter(range(36))
    _, samples = read_all(dest, "train")
    truth = {int(s["id"]): int(s["cls"]) for s in samples}
    assert all(truth[i] == label for i, label in zip(ids, labels))


def test_cli_writes_shards_and_lists_unreadable_files(image_tree, tmp_path):
    result = subprocess.run([sys.executable, "-m", "trivit", "shards", str(image_tree), str(tmp_path / "out"),
                             "--samples-per-shard", "10", "--workers", "2", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train: 36 samples in 4 shards" in result.stdout
    assert "left out 3 files or folders" in result.stderr and "broken.jpg" in result.stderr
    assert torch.tensor(read_index(tmp_path / "out" / "index.json")["splits"]["val"]["counts"]).sum() == 12


def test_max_size_stores_each_image_with_its_shorter_side_at_most_n(tmp_path):
    """A 500x375 JPEG becomes a 427x320 JPEG, a 480x360 PNG a 427x320 PNG equal to PIL's bicubic resize, and a
    200x150 JPEG keeps its bytes; the index records the size."""
    rng = np.random.default_rng(1)
    root = tmp_path / "tree"
    (root / "train" / "a").mkdir(parents=True)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    smooth.save(root / "train" / "a" / "big.jpg", quality=95)
    smooth.resize((480, 360), Image.BICUBIC).save(root / "train" / "a" / "big.png")
    smooth.resize((200, 150), Image.BICUBIC).save(root / "train" / "a" / "small.jpg", quality=90)
    index, _ = write_imagefolder(root, tmp_path / "shards", progress=False, max_size=320)
    assert index["train"]["max_size"] == 320
    shard = str(tmp_path / "shards" / index["train"]["shards"][0])
    stored = []
    for sample in wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples()):
        suffix = "png" if "png" in sample else "jpg"
        with Image.open(io.BytesIO(sample[suffix])) as image:
            stored.append((suffix, image.size, np.asarray(image.convert("RGB"), dtype=np.float64), sample[suffix]))
    assert sorted((suffix, size) for suffix, size, _, _ in stored) == [
        ("jpg", (200, 150)), ("jpg", (427, 320)), ("png", (427, 320))]
    by_kind = {(suffix, size): (pixels, data) for suffix, size, pixels, data in stored}
    assert by_kind[("jpg", (200, 150))][1] == (root / "train" / "a" / "small.jpg").read_bytes()
    png_reference = np.asarray(Image.open(root / "train" / "a" / "big.png").convert("RGB").resize(
        (427, 320), Image.BICUBIC), dtype=np.float64)
    assert np.array_equal(by_kind[("png", (427, 320))][0], png_reference)
    jpeg_reference = np.asarray(smooth.resize((427, 320), Image.BICUBIC), dtype=np.float64)
    assert np.abs(by_kind[("jpg", (427, 320))][0] - jpeg_reference).mean() < 3.0, "within JPEG's re-encoding error"
