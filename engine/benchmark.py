"""``trivit bench speed``: training-step speed, FLOPs and memory of the sparsity variants, side by side.

Every variant of a model is built once, warmed up, then all are timed in turns (interleaved)
for several repeats, so a noisy machine slows them alike; medians and min-max are reported.
A step is forward, per-sample cross-entropy, backward and AdamW on one fixed batch. The
reference is timm's own dense ViT. The example level costs per epoch, not per step: its step
carries the bookkeeping (recording [CLS] attention, updating the statistics) and its epoch has
(1 - removed) of the steps, so its epoch speed-up is the step ratio / (1 - removed).

FLOPs per image are analytic (``trivit.sparse.flops``) and checked against
``torch.utils.flop_counter`` on the same forward pass; the FLOPs ceiling of a variant is dense
FLOPs over its FLOPs per epoch. Memory is the peak CUDA allocation on a GPU and, everywhere, the
bytes of activations saved for backward (what token pruning shrinks).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trivit.engine.loss import per_sample_cross_entropy, smoothed_targets
from trivit.sparse import create_vit, set_keep_rates
from trivit.sparse.examples import ExampleStats
from trivit.sparse.flops import model_flops


@dataclass(frozen=True)
class Variant:
    name: str
    tokens: float = 1.0
    attention: float = 1.0
    removed: float = 0.0
    """Fraction of the training set the example level leaves out of each epoch."""
    timm_dense: bool = False


VARIANTS = (
    Variant("dense (timm)", timm_dense=True),
    Variant("dense (trivit blocks)"),
    Variant("tokens 0.9", tokens=0.9),
    Variant("tokens 0.8", tokens=0.8),
    Variant("tokens 0.7", tokens=0.7),
    Variant("tokens 0.5", tokens=0.5),
    Variant("attention 0.2", attention=0.2),
    Variant("examples 20%", removed=0.2),
    Variant("tokens 0.7 + attention 0.2", tokens=0.7, attention=0.2),
    Variant("all three (0.7 / 0.2 / 20%)", tokens=0.7, attention=0.2, removed=0.2),
)
LOCATIONS = [3, 6, 9]


@dataclass
class Measured:
    variant: Variant
    step_seconds: list[float] = field(default_factory=list)
    flops_analytic: float = 0.0
    flops_counted: float = 0.0
    saved_activation_bytes: int = 0
    peak_cuda_bytes: int | None = None


@dataclass
class Trainable:
    """A model with its optimizer, shared by every variant that runs on it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


def build_trainables(model_name: str, device: torch.device) -> tuple[Trainable, Trainable]:
    """timm's dense ViT, and one trivit ViT (pruning at LOCATIONS) whose keep rates each variant sets.

    Two models in all, whatever the number of variants: ten copies of deit_base with AdamW
    states would not fit a 24 GiB machine.
    """
    torch.manual_seed(0)
    dense = timm.create_model(model_name).to(device).train()
    sparse = create_vit(model_name, {"tokens": {"locations": LOCATIONS}}).to(device).train()
    return (Trainable(dense, torch.optim.AdamW(dense.parameters(), lr=1e-4)),
            Trainable(sparse, torch.optim.AdamW(sparse.parameters(), lr=1e-4)))


class Runner:
    """One variant: the trainable it runs on, its keep rates and (for the example level) statistics."""

    def __init__(self, variant: Variant, trainables: tuple[Trainable, Trainable], batch: int, device: torch.device,
                 amp_dtype: torch.dtype | None):
        self.variant, self.device, self.amp_dtype = variant, device, amp_dtype
        trainable = trainables[0] if variant.timm_dense else trainables[1]
        self.model, self.optimizer = trainable.model, trainable.optimizer
        self.stats = ExampleStats(batch * 100, device) if variant.removed else None
        generator = torch.Generator().manual_seed(0)
        size = self.model.patch_embed.img_size
        self.images = torch.randn(batch, 3, *size, generator=generator).to(device)
        self.labels = torch.randint(0, self.model.num_classes, (batch,), generator=generator).to(device)
        self.targets = smoothed_targets(self.labels, self.model.num_classes, 0.1)
        self.ids = torch.arange(batch, device=device)

    def activate(self) -> None:
        """Put the shared model in this variant's state (keep rates, [CLS]-attention recording)."""
        if self.variant.timm_dense:
            return
        set_keep_rates(self.model, self.variant.tokens, self.variant.attention)
        self.model.blocks.record_cls_attention = self.stats is not None

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(self.images)
        losses = per_sample_cross_entropy(logits, self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        self.optimizer.step()
        if self.stats is not None:
            self.stats.update(self.ids, logits.detach(), self.labels, self.model.blocks.last_cls_attention,
                              losses.detach())

    def timed(self, steps: int) -> float:
        """Mean seconds per step over ``steps`` steps."""
        self.activate()
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return (time.perf_counter() - start) / steps

    def flops_per_image(self) -> tuple[float, float]:
        """(analytic, counted by torch's FlopCounterMode) forward FLOPs per image."""
        self.activate()
        batch = self.images.shape[0]
        # the math backend spells attention as matmuls, which the counter sees (fused CPU kernels it skips)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            self.model(self.images)
        counted = counter.get_total_flops() / batch
        if self.variant.timm_dense:
            with torch.device("meta"):  # the same shapes, for the analytic count only
                reference = create_vit(self.model.default_cfg["architecture"], None)
            return model_flops(reference, 1.0), counted
        return model_flops(self.model), counted

    def saved_activation_bytes(self) -> int:
        """Bytes of the tensors autograd saves for backward in one forward pass."""
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        self.activate()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            self.model(self.images)
        return total

    def peak_cuda_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        self.activate()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        return torch.cuda.max_memory_allocated(self.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_model(model_name: str, variants: tuple[Variant, ...], batch: int, repeats: int, steps: int,
                  warmup: int, device: torch.device, amp_dtype: torch.dtype | None) -> list[Measured]:
    trainables = build_trainables(model_name, device)
    runners = [Runner(v, trainables, batch, device, amp_dtype) for v in variants]
    results = [Measured(v) for v in variants]
    for runner, result in zip(runners, results):
        result.flops_analytic, result.flops_counted = runner.flops_per_image()
        result.saved_activation_bytes = runner.saved_activation_bytes()
        result.peak_cuda_bytes = runner.peak_cuda_bytes()
        if warmup:
            runner.timed(warmup)
    for _ in range(repeats):
        for runner, result in zip(runners, results):
            result.step_seconds.append(runner.timed(steps))
    return results


def summary_rows(model_name: str, batch: int, results: list[Measured]) -> list[dict[str, Any]]:
    dense = results[0]
    dense_median = statistics.median(dense.step_seconds)
    rows = []
    for result in results:
        variant = result.variant
        median = statistics.median(result.step_seconds)
        epoch_share = 1 - variant.removed
        rows.append({
            "model": model_name, "variant": variant.name, "batch": batch,
            "img_per_s": batch / median, "img_per_s_min": batch / max(result.step_seconds),
            "img_per_s_max": batch / min(result.step_seconds),
            "step_speedup": dense_median / median,
            "epoch_speedup": dense_median / median / epoch_share,
            "flops_ceiling": dense.flops_analytic / (result.flops_analytic * epoch_share),
            "gflops_analytic": result.flops_analytic / 1e9, "gflops_counted": result.flops_counted / 1e9,
            "saved_activations_mb": result.saved_activation_bytes / 2**20,
            "peak_cuda_mb": result.peak_cuda_bytes / 2**20 if result.peak_cuda_bytes is not None else None,
            "step_seconds": result.step_seconds, "variant_spec": asdict(variant),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | img/s (median) | min-max | step speed-up | epoch speed-up | FLOPs ceiling | "
             "GFLOPs/img (analytic / counted) | activations MB | peak CUDA MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['img_per_s']:.1f} | {r['img_per_s_min']:.1f}-"
                     f"{r['img_per_s_max']:.1f} | {r['step_speedup']:.2f}x | {r['epoch_speedup']:.2f}x | "
                     f"{r['flops_ceiling']:.2f}x | {r['gflops_analytic']:.2f} / {r['gflops_counted']:.2f} | "
                     f"{r['saved_activations_mb']:.0f} | {peak} |")
    return "\n".join(lines)


def overheads(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per model: the attention level's step time over tokens-only, and the example level's
    bookkeeping per step over the same blocks without it (in %)."""
    found = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        seconds = {r["variant"]: statistics.median(r["step_seconds"]) for r in rows if r["model"] == model}
        found[f"{model}: attention 0.2 on top of tokens 0.7"] = 100 * (
            seconds["tokens 0.7 + attention 0.2"] / seconds["tokens 0.7"] - 1)
        found[f"{model}: example-level bookkeeping per step"] = 100 * (
            seconds["examples 20%"] / seconds["dense (trivit blocks)"] - 1)
    return found


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(len(models), 1, figsize=(8, 3.2 * len(models)), squeeze=False)
    for axis, model in zip(axes[:, 0], models):
        mine = [r for r in rows if r["model"] == model]
        positions = range(len(mine))
        axis.barh([p + 0.2 for p in positions], [r["epoch_speedup"] for r in mine], height=0.4, label="measured")
        axis.barh([p - 0.2 for p in positions], [r["flops_ceiling"] for r in mine], height=0.4, alpha=0.5,
                  label="FLOPs ceiling")
        axis.set_yticks(list(positions), [r["variant"] for r in mine])
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_title(f"{model}: speed-up over timm dense (per epoch)")
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def bench_speed(models: list[str], batch: int, repeats: int, steps: int, warmup: int, out: Path,
                variants: tuple[Variant, ...] = VARIANTS) -> list[dict[str, Any]]:
    """Measure every model, print the table and overheads, write ``speed.{md,json,png}`` under ``out``."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    machine = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    for model in models:
        results = measure_model(model, variants, batch, repeats, steps, warmup, device, amp_dtype)
        rows += summary_rows(model, batch, results)
    header = (f"{machine}; {'bf16 autocast' if amp_dtype else 'fp32'}; batch {batch}; {repeats} interleaved repeats "
              f"x {steps} steps after {warmup} warm-up steps; torch {torch.__version__}, timm {timm.__version__}")
    table = markdown(rows)
    extra = "\n".join(f"- {name}: {value:+.1f}%" for name, value in overheads(rows).items())
    report = f"{header}\n\n{table}\n\n{extra}\n"
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.md").write_text(report)
    (out / "speed.json").write_text(json.dumps({"machine": machine, "header": header, "rows": rows}, indent=1))
    plot(rows, out / "speed.png")
    return rows


def seconds_per_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                           labels: torch.Tensor, steps: int) -> float:
    """Mean wall-clock seconds of ``steps`` steps of forward, cross-entropy, backward and optimizer step."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(images.device)
    return (time.perf_counter() - start) / steps
