"""Effective attention density per pruning location (the fraction of kept patch-to-patch links that
the mask lets through), for a timm ViT at given token and attention keep rates.

With the reference code's rule (links >= the row's k-th largest value, ties kept) the density is
the keep rate at the first location and above it at the later ones, whose ranking attention was
computed under the previous mask. Weights are timm's initialisation (seeded), optionally with the
query/key projections scaled to sharpen the attention as training does; images are random.

    .venv/bin/python benchmarks/attention_density.py --model deit_small_patch16_224 --sharpen 1 5
"""
from __future__ import annotations

import argparse

import torch

from trivit.sparse import create_vit


@torch.no_grad()
def densities(model_name: str, tokens: float, attention: float, sharpen: float, batch: int, seed: int) -> dict[int, float]:
    torch.manual_seed(seed)
    sparsity = {"tokens": {"keep_rate": tokens}, "attention": {"keep_rate": attention}}
    model = create_vit(model_name, sparsity).eval()
    for block in model.blocks:
        block.attn.qkv.weight[: 2 * model.embed_dim].mul_(sharpen)  # queries and keys
    model(torch.randn(batch, 3, 224, 224))
    return {block: value.item() for block, value in model.blocks.attention_density.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--tokens", type=float, default=0.7)
    parser.add_argument("--attention", type=float, default=0.2)
    parser.add_argument("--sharpen", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    print(f"| {args.model}, tokens {args.tokens}, attention {args.attention} | seed | "
          + " | ".join(f"block {b}" for b in (3, 6, 9)) + " |")
    print("|---|---|---|---|---|")
    for sharpen in args.sharpen:
        for seed in args.seeds:
            found = densities(args.model, args.tokens, args.attention, sharpen, args.batch, seed)
            print(f"| q/k x {sharpen:g} | {seed} | " + " | ".join(f"{found[b]:.3f}" for b in sorted(found)) + " |")


if __name__ == "__main__":
    main()
