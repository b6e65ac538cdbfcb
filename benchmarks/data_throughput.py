"""The input pipeline's throughput, before and after the uint8 split, measured side by side in one run.

    python benchmarks/data_throughput.py [--images 512] [--repeats 3] [--out benchmarks/results/data]
    python benchmarks/data_throughput.py --device cuda --only device

ImageNet-like JPEGs (500x375, quality 90) are cut from a real photograph that matplotlib ships
(``grace_hopper.jpg``: random crops, flips and colour shifts, so each has a photo's detail), written
with ``trivit shards`` as it is and with ``--max-size 320``, then read through the DeiT training
pipeline at 224 px (random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25)
by real loader worker processes. Reported, medians of ``--repeats``:

- img/s of one worker and of two (per CPU core), for ``float``: the whole timm transform in the worker,
  float32 out (trivit before), ``uint8``: the worker's part only, uint8 and an erase box out, the device
  normalising and erasing (now), and ``uint8, --max-size 320``;
- the bytes per image that cross from a worker to the training process;
- where a worker's time goes, per image, in one process on one thread: decode (PIL, and torchvision's
  libjpeg-turbo decoder for comparison), crop and flip,
  RandAugment, the tensor conversion, normalisation and erasing (before) or the erase box (now);
- the time from an epoch's loader start to its first batch at ``shuffle_initial`` 2000 (the whole
  buffer, before) and 64 (now), and with the workers started before a 1 s evaluation (now, at epoch ends);
- ``data.decode_on: device``: a worker's img/s when it only reads the header and draws the augmentation,
  the bytes it hands over, and the device's img/s decoding and painting batches of 128 (``--device``: here
  the CPU; ``benchmarks/gpu_check.sh`` runs ``--device cuda --only device`` on a GPU);
- Pillow's ``draft`` (DCT-domain downscaling while decoding) on 2000x1500 photos, against a full decode;
- the workers one GPU needs at 1,000, 3,000 and 5,000 img/s.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms
from torchvision.io import decode_jpeg

from trivit.datasets.config import DataConfig
from trivit.datasets.device_augment import device_augment, device_train_transform
from trivit.datasets.imagefolder import write_imagefolder
from trivit.datasets.loaders import train_loader
from trivit.datasets.stream import SampleDecoder, StreamLayout, expand_urls, seeded_rng
from trivit.datasets.transforms import NO_ERASE, DeviceTransform, erase_box, train_transform

SIZE = 224
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def make_jpegs(root: Path, count: int) -> None:
    """``count`` 500x375 JPEGs cut from the photo (random crop at a random scale, flip, channel gains)."""
    rng = np.random.default_rng(0)
    photo = Image.open(PHOTO).convert("RGB")
    for i in range(count):
        scale = rng.uniform(1.0, 1.6)
        big = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
        left, top = rng.integers(0, big.width - 500 + 1), rng.integers(0, big.height - 375 + 1)
        crop = np.asarray(big.crop((left, top, left + 500, top + 375)), dtype=np.float64)
        crop = np.clip(crop * rng.uniform(0.7, 1.3, size=3), 0, 255).astype(np.uint8)
        image = Image.fromarray(crop[:, ::-1] if i % 2 else crop)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=90)


def float_transform(data: DataConfig):
    """trivit before the split: timm's whole transform in the worker (float32, normalised, erased)."""
    whole = create_transform((3, SIZE, SIZE), is_training=True, scale=tuple(data.scale), hflip=data.hflip,
                             auto_augment=data.auto_augment, re_prob=data.re_prob, interpolation=data.interpolation,
                             mean=tuple(data.mean), std=tuple(data.std))
    no_erase = torch.tensor(NO_ERASE, dtype=torch.int32)
    return lambda image: (whole(image), no_erase)


def loader_rate(urls: list[str], transform, workers: int, batches: int, batch: int = 32) -> tuple[float, int]:
    """(img/s, bytes per image handed over) of ``workers`` worker processes reading ``batches`` batches."""
    layout = StreamLayout.for_rank(tuple(urls), seed=0, epoch=0, rank=0, world_size=1, num_workers=workers)
    loader = train_loader(layout, SampleDecoder(transform, "RGB"), batch_size=batch, start=0, stop=batches + workers,
                          shuffle_buffer=64, shuffle_initial=64, num_workers=workers)
    with loader.batches() as stream:
        first = [next(stream) for _ in range(workers)]  # the workers are up and running
        start = time.perf_counter()
        count = sum(len(b.ids) for b in stream)
        seconds = time.perf_counter() - start
    images, plan = first[0].images, first[0].plan
    if plan is not None:  # bytes of the JPEGs (or decoded images) and of their plans, per image
        return count / seconds, round(sum(i.numel() for i in images) / len(images) + plan[0].numel() * 8)
    return count / seconds, images.element_size() * images[0].numel()


def first_batch_seconds(urls: list[str], transform, shuffle_initial: int, started_before_s: float = 0.0) -> float:
    """Seconds from an epoch's start to its first batch (one worker, a 2000-sample shuffle buffer); with
    ``started_before_s``, the loader's workers were started that many seconds before the epoch (the trainer
    starts them before the evaluation at an epoch's end)."""
    layout = StreamLayout.for_rank(tuple(urls), seed=0, epoch=0, rank=0, world_size=1, num_workers=1)
    start = time.perf_counter()
    loader = train_loader(layout, SampleDecoder(transform, "RGB"), batch_size=32, start=0, stop=1,
                          shuffle_buffer=2000, shuffle_initial=shuffle_initial, num_workers=1)
    with loader.batches() as stream:
        if started_before_s:
            time.sleep(started_before_s)  # the evaluation
            start = time.perf_counter()
        next(stream)
        return time.perf_counter() - start


def device_rate(files: list[Path], data: DataConfig, device: torch.device, batch: int = 128,
                repeats: int = 3) -> float:
    """img/s of ``DeviceAugment`` on ``device``: decoding and painting batches of ``batch`` drawn plans."""
    drawn, paint = device_train_transform(data, SIZE), device_augment(data, SIZE, device)
    payloads, plans = [], []
    for seed, file in enumerate((files * (batch // len(files) + 1))[:batch]):
        raw = file.read_bytes()
        with seeded_rng(seed), Image.open(io.BytesIO(raw)) as header:
            payload, _, plan = drawn(raw, header, "RGB")
        payloads.append(payload.pin_memory() if device.type == "cuda" else payload)
        plans.append(plan)
    plan = torch.stack(plans)
    rates = []
    for _ in range(repeats + 1):  # the first warms up (nvJPEG handles, kernels)
        start = time.perf_counter()
        paint(payloads, plan)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def draft_decode(repeats: int = 3) -> dict[str, float]:
    """ms per 2000x1500 JPEG: Pillow's full decode, and ``draft`` to the largest DCT scale whose image still holds
    a 448-px side (2x a 224 crop), as a loader could use for images far larger than their crop."""
    photo = Image.open(PHOTO).convert("RGB").resize((2000, 1500), Image.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    raw = buffer.getvalue()
    times: dict[str, list[float]] = {"full decode, 2000x1500": [], "draft to >= 448 px (1/2 scale: 1000x750)": []}
    for _ in range(repeats):
        for name in times:
            start = time.perf_counter()
            for _ in range(5):
                with Image.open(io.BytesIO(raw)) as image:
                    if name.startswith("draft"):
                        image.draft("RGB", (896, 672))
                    image.convert("RGB")
            times[name].append((time.perf_counter() - start) / 5 * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def breakdown(files: list[Path], data: DataConfig) -> dict[str, float]:
    """Milliseconds per image of each stage, in this process on one thread, on ``files``."""
    torch.set_num_threads(1)
    split = train_transform(data, SIZE)
    stages = split.augment.transforms  # crop, flip, RandAugment, to tensor
    crop_flip, augment, to_tensor = transforms.Compose(stages[:2]), stages[2], stages[3]
    whole = float_transform(data)
    device = DeviceTransform(data.mean, data.std, torch.device("cpu"))
    raw = [f.read_bytes() for f in files]
    times: dict[str, list[float]] = {}

    def timed(name: str, function, items):
        start = time.perf_counter()
        out = [function(i) for i in items]
        times.setdefault(name, []).append((time.perf_counter() - start) / len(items) * 1e3)
        return out

    for _ in range(3):
        decoded = timed("decode (PIL)", lambda d: Image.open(io.BytesIO(d)).convert("RGB"), raw)
        timed("decode (torchvision.io.decode_jpeg)", lambda d: decode_jpeg(torch.frombuffer(bytearray(d),
                                                                                         dtype=torch.uint8)), raw)
        with seeded_rng(0):
            cropped = timed("random resized crop + flip", crop_flip, decoded)
            augmented = timed("RandAugment", augment, cropped)
            tensors = timed("to uint8 tensor", to_tensor, augmented)
            timed("erase box (now)", lambda t: erase_box(split.erasing, t.shape[-2], t.shape[-1]), tensors)
            timed("whole timm transform (before)", lambda image: whole(image)[0], decoded)
        start = time.perf_counter()
        device(torch.stack(tensors), torch.zeros(len(tensors), 4, dtype=torch.int32))
        times.setdefault("normalise + erase on the device (here the CPU), per image", []).append(
            (time.perf_counter() - start) / len(tensors) * 1e3)
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data"))
    parser.add_argument("--device", default="cpu", help="where data.decode_on=device decodes and paints")
    parser.add_argument("--only", choices=["device"], help="measure only the device's decode-and-paint rate")
    args = parser.parse_args()
    data = DataConfig()
    results: dict[str, object] = {}
    if args.only == "device":
        with tempfile.TemporaryDirectory() as tmp:
            make_jpegs(Path(tmp), 128)
            rate = device_rate(sorted(Path(tmp).rglob("*.jpg")), data, torch.device(args.device))
        print(f"data.decode_on=device on {args.device}: {rate:,.0f} img/s decoding (decode_jpeg) and painting the "
              "DeiT augmentation (crop, flip, RandAugment) of 500x375 JPEGs, batches of 128, median of 3")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        make_jpegs(tree, args.images)
        shards = {}
        for name, max_size in (("full", None), ("max320", 320)):
            index, _ = write_imagefolder(tree, Path(tmp) / name, samples_per_shard=64, progress=False,
                                         max_size=max_size)
            shards[name] = expand_urls(str(Path(tmp) / name / index["train"]["urls"]))
        batches = args.images // 32 - 2
        variants = {"float": (shards["full"], float_transform(data)),
                    "uint8": (shards["full"], train_transform(data, SIZE)),
                    "uint8, --max-size 320": (shards["max320"], train_transform(data, SIZE)),
                    "decode_on=device (the worker's part)": (shards["full"], device_train_transform(data, SIZE))}
        rates: dict[str, dict[int, list[float]]] = {name: {1: [], 2: []} for name in variants}
        handed = {}
        for _ in range(args.repeats):  # interleaved rounds
            for name, (urls, transform) in variants.items():
                for workers in (1, 2):
                    rate, handed[name] = loader_rate(urls, transform, workers, batches)
                    rates[name][workers].append(rate)
        starts = {f"data.shuffle_initial {initial}{' (before: the whole buffer)' if initial == 2000 else ''}":
                  [first_batch_seconds(shards["full"], train_transform(data, SIZE), initial)
                   for _ in range(args.repeats)] for initial in (2000, 64)}
        starts["data.shuffle_initial 64, workers started before a 1 s evaluation (now, at epoch ends)"] = [
            first_batch_seconds(shards["full"], train_transform(data, SIZE), 64, started_before_s=1.0)
            for _ in range(args.repeats)]
        files = sorted(tree.rglob("*.jpg"))
        stages = breakdown(files[:64], data)
        on_device = device_rate(files[:128], data, torch.device(args.device))
        drafts = draft_decode(args.repeats)
    medians = {name: {w: statistics.median(r) for w, r in by.items()} for name, by in rates.items()}
    lines = [f"{os.cpu_count()} CPU cores; {args.images} JPEGs of 500x375 cut from a photo; DeiT training "
             "augmentation at 224 px; real loader worker processes; medians of "
             f"{args.repeats} interleaved rounds.", "",
             "| pipeline | bytes handed over per image | img/s, 1 worker | img/s, 2 workers | per core (2 workers) |"
             " vs float, 1 worker |", "|---|---|---|---|---|---|"]
    base = medians["float"][1]
    for name, by in medians.items():
        lines.append(f"| {name} | {handed[name]:,} | {by[1]:.0f} | {by[2]:.0f} | {by[2] / 2:.0f} | "
                     f"{by[1] / base:.2f}x |")
    lines += ["", "| stage (one thread, one process) | ms per image |", "|---|---|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in stages.items()]
    lines += ["", "| epoch start to first batch (1 worker, shuffle buffer 2000) | seconds (median) |", "|---|---|"]
    lines += [f"| {name} | {statistics.median(values):.2f} |" for name, values in starts.items()]
    lines += ["", f"| data.decode_on=device, the device's part on {args.device} (batches of 128) | img/s |", "|---|---|",
              f"| decode (decode_jpeg) + crop + flip + RandAugment | {on_device:,.0f} |"]
    lines += ["", "| Pillow decode of a 2000x1500 JPEG (one thread) | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in drafts.items()]
    per_worker, drawing = medians["uint8"][1], medians["decode_on=device (the worker's part)"][1]
    lines += ["", "| GPU consumption | workers needed, uint8 (one per core) | workers needed, decode_on=device |",
              "|---|---|---|"]
    lines += [f"| {rate:,} img/s | {rate / per_worker:.1f} | {rate / drawing:.1f} |" for rate in (1000, 3000, 5000)]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_throughput.md").write_text(table + "\n")
    results.update(rates=rates, handed=handed, first_batch=starts, stages=stages, device_img_per_s=on_device,
                   draft_ms=drafts)
    (args.out / "data_throughput.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
