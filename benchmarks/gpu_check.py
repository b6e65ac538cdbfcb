"""The measurements of ``benchmarks/gpu_check.sh`` that run inside one Python process, one section a call:

    python benchmarks/gpu_check.py SECTION [--smoke]

Sections (each prints Markdown for the report):

- ``kernels``: which SDPA kernel a masked and an unmasked call get, what each kernel accepts, and
  their fwd+bwd milliseconds (ViT-B shapes, bf16);
- ``flex``: the share of flex_attention's 128/64/32/16 tiles the attention level's masks let it skip
  at 139 and 785 tokens, and compiled flex against SDPA with the mask (fwd+bwd ms);
- ``fsdp``: vit_large with all three levels under FSDP2 on one rank, with and without activation
  checkpointing (peak GiB, ms/step), and a sharded checkpoint round trip;
- ``syncs``: host syncs per training step by file:line (``torch.cuda.set_sync_debug_mode("warn")``),
  steps 11..30 of a trainer run with all three levels against steps 1..10.

``--smoke`` runs each section at toy sizes on the CPU (what CUDA alone can measure says so): the
suite runs it so that the GPU check's own code is known to work before a GPU machine runs it.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.conftest's synthetic shards


def timed_ms(step: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``step`` (CUDA events on a GPU, the wall clock on the CPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            began = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - began))
    return statistics.median(times)


def sdpa_op(call: Callable[[], torch.Tensor]) -> str:
    """The ATen SDPA implementation ``call`` dispatched to, read off the profiler's op names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    names = {event.key for event in prof.key_averages()}
    for op, kernel in (("flash", "flash"), ("efficient", "memory-efficient"), ("cudnn", "cuDNN"), ("math", "math")):
        if any(f"_scaled_dot_product_{op}" in name or (op == "math" and "attention_math" in name) for name in names):
            return kernel
    return "unknown: " + ", ".join(sorted(n for n in names if "attention" in n))


def section_kernels(smoke: bool) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from trivit.sparse.blocks import additive_mask

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    batch, heads, length, dim = (2, 2, 17, 8) if smoke else (64, 12, 197, 64)
    q, k, v = (torch.randn(batch, heads, length, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    links = torch.rand(batch, 1, length, length, device=device) < 0.3
    links |= torch.eye(length, dtype=torch.bool, device=device)
    masks = {"no mask": None, "boolean mask": links, "additive mask (trivit on CUDA)": additive_mask(links, dtype)}
    print(f"\nbatch {batch}, {heads} heads, {length} tokens, head dim {dim}, {dtype}, {device}\n")
    print("| call | kernel torch picks | fwd+bwd ms | flash | memory-efficient | cuDNN |")
    print("|---|---|---|---|---|---|")
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cuDNN": SDPBackend.CUDNN_ATTENTION}
    for name, mask in masks.items():
        def forward_backward(mask=mask):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

        picked = sdpa_op(lambda mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        ms = timed_ms(forward_backward, device, repeats=3 if smoke else 20)
        accepts = []
        for backend in backends.values():
            try:
                with sdpa_kernel([backend]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                accepts.append("yes")
            except RuntimeError:
                accepts.append("refuses")
        print(f"| {name} | {picked} | {ms:.3f} | {' | '.join(accepts)} |")


def section_flex(smoke: bool) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from trivit.sparse.attention import build_attention_mask
    from trivit.sparse.blocks import additive_mask

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    batch, heads, dim = (2, 2, 8) if smoke else (16, 12, 64)
    print("\nMasks of the attention level at keep rate 0.2 over the kept patches ([CLS] always linked), from "
          "random attention; the share of flex tiles skipped is create_block_mask's sparsity.\n")
    print("| tokens | tiles 128 | tiles 64 | tiles 32 | tiles 16 | flex fwd+bwd ms | SDPA (additive mask) fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|")
    lengths = (17, 33) if smoke else (139, 785)
    flex = flex_attention if smoke else torch.compile(flex_attention, dynamic=False)
    for length in lengths:
        attention = torch.softmax(torch.randn(batch, length, length, device=device), dim=-1)
        kept = torch.arange(length - 1, device=device).expand(batch, -1)
        mask = build_attention_mask(attention, kept, 0.2, 1, 0)

        def kept_link(b, h, q, kv, mask=mask):
            return mask[b, 0, q, kv]

        shares = []
        for size in (128, 64, 32, 16):
            block_mask = create_block_mask(kept_link, batch, None, length, length, device=device, BLOCK_SIZE=size)
            shares.append(f"{block_mask.sparsity():.1f}%")
        q, k, v = (torch.randn(batch, heads, length, dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        block_mask = create_block_mask(kept_link, batch, None, length, length, device=device)
        bias = additive_mask(mask, dtype)

        def sdpa_step(q=q, k=k, v=v, bias=bias) -> None:
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward()

        sdpa_ms = timed_ms(sdpa_step, device, repeats=3 if smoke else 20)
        if smoke:
            flex_ms = "n/a (no flex backward on the CPU)"
        else:
            def flex_step(q=q, k=k, v=v, block_mask=block_mask) -> None:
                flex(q, k, v, block_mask=block_mask).sum().backward()

            flex_ms = f"{timed_ms(flex_step, device, 20, 3):.3f}"
        print(f"| {length} | {' | '.join(shares)} | {flex_ms} | {sdpa_ms:.3f} |")


def section_fsdp(smoke: bool) -> None:
    import torch.distributed as dist

    from trivit.config import load
    from trivit.engine.backends.fsdp import FSDPBackend
    from trivit.engine.config import TrainConfig
    from trivit.engine.distributed import World
    from trivit.engine.optim import build_optimizer
    from trivit.sparse import create_vit, set_keep_rates

    device = torch.device("cpu" if smoke else "cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    name, size, batch = ("deit_tiny_patch16_224", 32, 4) if smoke else ("vit_large_patch16_224", 224, 32)
    dist.init_process_group("gloo" if smoke else "nccl", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{29400 + os.getpid() % 1000}")
    world = World(rank=0, world_size=1, local_rank=0)
    sparsity = {"tokens": {"keep_rate": 0.7}, "attention": {"keep_rate": 0.2}}
    amp = None if smoke else torch.bfloat16
    config = load(TrainConfig, None, ["engine.backend=fsdp", f"model.name={name}", "optim.ema_decay=null",
                                      f"engine.precision={'fp32' if smoke else 'bf16'}"])

    def backend_for(checkpointing: bool, seed: int) -> FSDPBackend:
        torch.manual_seed(seed)
        model = create_vit(name, sparsity, img_size=size, num_classes=1000, drop_path_rate=0.1).to(device)
        set_keep_rates(model, 0.7, 0.2)
        model.set_grad_checkpointing(checkpointing)
        backend = FSDPBackend(config, world, device, amp)
        backend.setup(model, lambda module: build_optimizer(module, config.optim, batch))
        return backend

    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    print(f"\n{name}, tokens 0.7 + attention 0.2 (the example level skips samples: no per-step cost), batch "
          f"{batch}, {'fp32' if smoke else 'bf16'}, FSDP2 on one rank ({device})\n")
    print("| activation checkpointing | ms/step | peak GiB |")
    print("|---|---|---|")
    for checkpointing in (False, True):
        backend = backend_for(checkpointing, seed=0)

        def step(backend=backend):
            loss = F.cross_entropy(backend.model(images).float(), labels)
            backend.backward(loss, last_micro_batch=True)
            backend.step()
            backend.zero_grad()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = timed_ms(step, device, repeats=2 if smoke else 5)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"| {'on' if checkpointing else 'off'} | {ms:.1f} | {peak:.2f} |")
    with tempfile.TemporaryDirectory(dir=os.environ.get("OUT")) as folder:
        backend.save(Path(folder))
        restored = backend_for(True, seed=1)
        restored.load(Path(folder), {})
        params = [(a.full_tensor(), b.full_tensor()) for a, b in zip(backend.model.parameters(),
                                                                      restored.model.parameters())]
        moments = [(backend.optimizer.state[a]["exp_avg"].full_tensor(), restored.optimizer.state[b]["exp_avg"].full_tensor())
                   for a, b in zip(backend.model.parameters(), restored.model.parameters())]
        same = all(torch.equal(a, b) for a, b in params + moments)
    print(f"\n- {'PASS' if same else 'FAIL'} sharded checkpoint round trip: {len(params)} parameters and their "
          "Adam moments restored bit for bit into a model initialised otherwise")
    dist.destroy_process_group()


def section_syncs(smoke: bool) -> None:
    from tests.conftest import NUM_CLASSES, synthetic_samples
    from trivit.config import load
    from trivit.datasets.shards import write_index, write_split
    from trivit.engine.config import TrainConfig
    from trivit.engine.trainer import Trainer

    if smoke:
        print("\n- n/a on the CPU: torch.cuda.set_sync_debug_mode reports CUDA syncs only "
              "(tests/engine/test_host_syncs.py counts host reads on the CPU)")
        return
    folder = Path(tempfile.mkdtemp(dir=os.environ.get("OUT")))
    write_index(folder, {"train": write_split(synthetic_samples(2048, size=32), folder, "train", 128)},
                [f"class{i}" for i in range(NUM_CLASSES)])
    overrides = [f"data.train_urls={folder}", "data.val_urls=", "data.batch_size=64", "data.num_workers=4",
                 "data.mean=[0.3]", "data.std=[0.3]", "data.auto_augment=null", "model.img_size=32",
                 "model.patch_size=4", "model.in_chans=1", "model.timm_kwargs={embed_dim: 192, depth: 4, num_heads: 3}",
                 "optim.ema_decay=0.999", "schedule.epochs=2", "schedule.warmup_epochs=0",
                 "checkpoint.every_steps=1000", "logging.every_steps=1000", "logging.progress_bar=false",
                 "sparsity.tokens.keep_rate=0.7", "sparsity.attention.keep_rate=0.2",
                 "sparsity.schedule.start_epochs=0", "sparsity.schedule.span_epochs=0",
                 "sparsity.examples.policy=forgetting", "sparsity.examples.initial_remove_fraction=0",
                 "engine.precision=bf16"]

    def census(steps: int) -> collections.Counter[str]:
        trainer = Trainer(load(TrainConfig, None, [*overrides, f"run_dir={folder}/run{steps}",
                                                   f"schedule.max_steps={steps}"]))
        sites: collections.Counter[str] = collections.Counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for warning in caught:
            if "synchroniz" in str(warning.message):
                sites[f"{Path(warning.filename).name}:{warning.lineno}"] += 1
        return sites

    added = census(30) - census(10)
    print("\nSteps 11..30 of all three levels + EMA + mixup, bf16, against steps 1..10 (the final step's log, "
          "checkpoint and export cancel out):\n")
    print(f"- {sum(added.values()) / 20:.2f} host syncs per step (target: at most 1)")
    for site, count in added.most_common():
        print(f"  - {site}: {count / 20:.2f} per step")


SECTIONS = {"kernels": section_kernels, "flex": section_flex, "fsdp": section_fsdp, "syncs": section_syncs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (checks this script's code)")
    args = parser.parse_args(argv)
    SECTIONS[args.section](args.smoke)


if __name__ == "__main__":
    main()
