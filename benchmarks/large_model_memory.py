"""ViT-Large with all three levels, trained a few steps through `trivit train`, with and without
activation checkpointing: peak resident memory and seconds per step, measured side by side.

    python benchmarks/large_model_memory.py [--batch 16] [--steps 3] [--modes checkpointed plain]

Writes 224 px RGB shards (random images, 10 classes) to a temporary folder, then runs each mode
in a fresh process of `python -m trivit train` (vit_large_patch16_224, tokens 0.7 at blocks
6/12/18, attention 0.2, the forgetting example level, targets from the first step, fp32 on the
CPU), and reads that process's peak RSS from the kernel (ru_maxrss of the waited-for child).
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from trivit.datasets.shards import write_index, write_split
from trivit.engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
LEVELS = ["sparsity.tokens.keep_rate=0.7", "sparsity.attention.keep_rate=0.2", "sparsity.examples.policy=forgetting",
          "sparsity.schedule.start_epochs=0", "sparsity.schedule.span_epochs=0"]


def samples(count: int):
    rng = np.random.default_rng(0)
    for sample_id in range(count):
        image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        yield {"__key__": f"{sample_id:08d}", "png": buffer.getvalue(), "cls": sample_id % 10, "id": sample_id}


def run_mode(shards: Path, run_dir: Path, batch: int, steps: int, checkpointed: bool) -> dict:
    """One training run in a child process; its peak RSS comes from this (fresh) parent's rusage."""
    command = [sys.executable, "-m", "trivit", "train", f"run_dir={run_dir}", "model.name=vit_large_patch16_224",
               f"data.train_urls={shards}", "data.val_urls=", f"data.batch_size={batch}", "data.num_workers=1",
               "model.num_classes=10", f"schedule.max_steps={steps}", "logging.every_steps=1",
               "logging.progress_bar=false", "optim.ema_decay=null", "engine.precision=fp32", "resume=never",
               f"engine.activation_checkpointing={str(checkpointed).lower()}", *LEVELS]
    probe = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"training failed:\n{done.stderr[-3000:]}")
    records = read_metrics(run_dir)
    seconds = [batch / r["img_per_s"] for r in records[1:]]  # the first step includes start-up
    return {"mode": "checkpointed" if checkpointed else "plain", "peak_rss_gib": int(done.stdout.split()[-1]) / 2**20,
            "seconds_per_step": sorted(seconds)[len(seconds) // 2], "wall_s": time.perf_counter() - start,
            "losses": [r["loss"] for r in records], "tokens_per_block": records[-1]["tokens_per_block"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=["checkpointed", "plain"], default=["checkpointed", "plain"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "large_model_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        split = write_split(samples(args.batch * (args.steps + 1)), shards, "train", args.batch)
        write_index(shards, {"train": split}, [f"class{i}" for i in range(10)])
        rows = [run_mode(shards, Path(tmp) / mode, args.batch, args.steps, mode == "checkpointed")
                for mode in args.modes]
    for row in rows:
        print(f"{row['mode']}: peak RSS {row['peak_rss_gib']:.2f} GiB, {row['seconds_per_step']:.1f} s/step "
              f"(median of steps 2..{args.steps}), losses {[round(v, 4) for v in row['losses']]}")
    Path(args.out).write_text(json.dumps({"batch": args.batch, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
