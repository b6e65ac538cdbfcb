"""Step time of the attention level against tokens-only, measured side by side in one process.

    python benchmarks/attention_overhead.py [--model deit_small_patch16_224] [--batch 32] [--repeats 7]

Variants (dense, tokens-only, tokens + attention) are interleaved, each timed over a few
training steps (forward, backward, AdamW) per repeat, after a warm-up; the table gives medians,
min-max and the ratio to dense, next to each variant's analytic FLOPs fraction.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from trivit.engine.benchmark import seconds_per_train_step
from trivit.sparse import create_vit
from trivit.sparse.flops import dense_fraction

VARIANTS = {
    "dense": {},
    "tokens 0.7": {"tokens": {"keep_rate": 0.7}},
    "tokens 0.7 + attention 0.2": {"tokens": {"keep_rate": 0.7}, "attention": {"keep_rate": 0.2}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = torch.randn(args.batch, 3, 224, 224), torch.randint(0, 1000, (args.batch,))
    setups = {}
    for name, sparsity in VARIANTS.items():
        model = create_vit(args.model, sparsity).train()
        setups[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        seconds_per_train_step(*setups[name], images, labels, 1)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, (model, optimizer) in setups.items():
            times[name].append(seconds_per_train_step(model, optimizer, images, labels, args.steps))
    dense = statistics.median(times["dense"])
    print(f"{args.model}, batch {args.batch}, {args.repeats} repeats x {args.steps} steps, "
          f"{torch.get_num_threads()} threads\n")
    print("| variant | step s (median) | min-max | img/s | speed-up vs dense | FLOPs fraction |")
    print("|---|---|---|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.3f} | {min(samples):.3f}-{max(samples):.3f} | {args.batch / median:.1f} | "
              f"{dense / median:.2f}x | {dense_fraction(setups[name][0]):.3f} |")
    tokens, both = (statistics.median(times[n]) for n in list(VARIANTS)[1:])
    print(f"\nattention level overhead on step time vs tokens-only: {100 * (both / tokens - 1):+.1f}%")


if __name__ == "__main__":
    main()
