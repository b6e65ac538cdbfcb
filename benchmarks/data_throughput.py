"""Loader throughput against the training step's consumption, measured in one run.

    python benchmarks/data_throughput.py [--images 256] [--models deit_tiny_patch16_224 deit_small_patch16_224]

Writes ImageNet-sized JPEGs (500x375) as an ImageFolder, converts them with `trivit shards`'
writer, then times (a) one loader worker: read + decode + DeiT training augmentation at 224 px
(random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing), and (b) the
training step (forward + backward + AdamW) of each model, and prints how many loader workers
each model needs so that data never waits. Medians over repeats.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trivit.datasets.config import DataConfig
from trivit.datasets.imagefolder import write_imagefolder
from trivit.datasets.loaders import train_loader
from trivit.datasets.stream import SampleDecoder, StreamLayout, expand_urls
from trivit.datasets.transforms import train_transform
from trivit.engine.workflows.benchmark import seconds_per_train_step
from trivit.sparse import create_vit


def make_jpegs(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((500, 375), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def loader_rate(urls: list[str], batch: int, batches: int) -> float:
    decode = SampleDecoder(train_transform(DataConfig(), 224), "RGB")
    layout = StreamLayout.for_rank(tuple(urls), seed=0, epoch=0, rank=0, world_size=1)
    start = time.perf_counter()
    count = sum(len(b.ids) for b in train_loader(layout, decode, batch_size=batch, start=0, stop=batches,
                                                 shuffle_buffer=64, num_workers=0))
    return count / (time.perf_counter() - start)


def step_rate(name: str, batch: int, steps: int) -> float:
    model = create_vit(name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    return batch / seconds_per_train_step(model, optimizer, images, labels, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp) / "tree", args.images)
        index, _ = write_imagefolder(Path(tmp) / "tree", Path(tmp) / "shards", samples_per_shard=64, progress=False)
        urls = expand_urls(str(Path(tmp) / "shards" / index["train"]["urls"]))
        loader_rate(urls, 16, 1)
        loader = [loader_rate(urls, 16, 8) for _ in range(args.repeats)]
        steps = {name: [step_rate(name, 32, 2) for _ in range(args.repeats)] for name in args.models}
    per_worker = statistics.median(loader)
    print(f"{torch.get_num_threads()} torch threads; JPEG 500x375 -> 224 px, DeiT training augmentation\n")
    print("| what | img/s (median) | min-max |")
    print("|---|---|---|")
    print(f"| one loader worker: read + decode + augment | {per_worker:.1f} | {min(loader):.1f}-{max(loader):.1f} |")
    for name, rates in steps.items():
        print(f"| {name} training step (batch 32) | {statistics.median(rates):.1f} | {min(rates):.1f}-{max(rates):.1f} |")
    print()
    for name, rates in steps.items():
        need = statistics.median(rates) / per_worker
        print(f"{name}: one worker supplies {per_worker / statistics.median(rates):.1f}x what the step consumes "
              f"({need:.2f} workers needed)")


if __name__ == "__main__":
    main()
