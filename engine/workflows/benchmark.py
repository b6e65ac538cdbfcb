"""``trivit bench speed``: training-step speed, FLOPs and memory of the sparsity variants, side by side.

Every variant of a model is built once, warmed up, then all are timed in turns (interleaved)
for several repeats, so a noisy machine slows them alike; medians and min-max are reported.
A step is forward, per-sample cross-entropy, backward and AdamW on one fixed batch. The
reference is timm's own dense ViT. The example level costs per epoch, not per step: its step
carries the bookkeeping (recording [CLS] attention, updating the statistics) and its epoch has
(1 - removed) of the steps, so its epoch speed-up is the step ratio / (1 - removed).

Each variant runs in every requested mode (eager or compiled, with or without activation
checkpointing, in each precision), all interleaved in the same rounds; a mode's speed-ups are
over timm's dense ViT in the same mode, and the modes are compared variant by variant.

FLOPs per image are analytic (``trivit.sparse.flops``) and checked against
``torch.utils.flop_counter`` on the same forward pass; the FLOPs ceiling of a variant is dense
FLOPs over its FLOPs per epoch. Memory is the peak CUDA allocation on a GPU and, everywhere, the
bytes of activations saved for backward (what token pruning shrinks).
"""
from __future__ import annotations

import json
import logging
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

from trivit.engine.compile import raise_recompile_limit
from trivit.engine.objectives.losses import per_sample_cross_entropy, smoothed_targets
from trivit.engine.startup import PRECISION_DTYPES, precision_name
from trivit.sparse import TapRequest, create_vit, set_keep_rates
from trivit.sparse.examples import ExampleStats
from trivit.sparse.flops import model_flops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str
    key: str = ""
    """Short name for ``--variants``."""
    tokens: float = 1.0
    attention: float = 1.0
    removed: float = 0.0
    """Fraction of the training set the example level leaves out of each epoch."""
    timm_dense: bool = False
    semantic: bool = False
    """Runs on the model with 16 semantic tokens (STViT's layout: the STGM at depth // 3)."""

    @property
    def trainable(self) -> str:
        return "timm" if self.timm_dense else "semantic" if self.semantic else "trivit"


VARIANTS = (
    Variant("dense (timm)", "timm", timm_dense=True),
    Variant("dense (trivit blocks)", "dense"),
    Variant("tokens 0.9", "tokens0.9", tokens=0.9),
    Variant("tokens 0.8", "tokens0.8", tokens=0.8),
    Variant("tokens 0.7", "tokens0.7", tokens=0.7),
    Variant("tokens 0.5", "tokens0.5", tokens=0.5),
    Variant("attention 0.2", "attention0.2", attention=0.2),
    Variant("examples 20%", "examples20", removed=0.2),
    Variant("tokens 0.7 + attention 0.2", "tokens0.7+attention0.2", tokens=0.7, attention=0.2),
    Variant("all three (0.7 / 0.2 / 20%)", "all3", tokens=0.7, attention=0.2, removed=0.2),
    Variant("semantic 16", "semantic16", semantic=True),
    Variant("semantic 16 + examples 20%", "semantic16+examples20", semantic=True, removed=0.2),
)
SEMANTIC_TOKENS = 16


@dataclass(frozen=True)
class Mode:
    """How a step runs: compiled or eager, activation checkpointing, autocast dtype (None = fp32)."""

    compiled: bool = False
    checkpointing: bool = False
    amp_dtype: torch.dtype | None = None
    explicit_attention: bool = False
    """Ranking blocks compute their attention explicitly (the path before the fused one)."""

    @property
    def name(self) -> str:
        return " ".join([("compiled" if self.compiled else "eager"), precision_name(self.amp_dtype)]
                        + (["checkpointed"] if self.checkpointing else [])
                        + (["explicit attention"] if self.explicit_attention else []))


def select_variants(keys: list[str] | None) -> tuple[Variant, ...]:
    """timm's dense ViT (every ratio's reference) and the variants named by ``keys`` (all if None)."""
    known = {v.key: v for v in VARIANTS}
    unknown = [key for key in keys or [] if key not in known]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r} in --variants; choose from {', '.join(known)}")
    return (VARIANTS[0], *[v for v in VARIANTS[1:] if keys is None or v.key in keys])


@dataclass
class Measured:
    variant: Variant
    mode: Mode = Mode()
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
    compiled: nn.Module | None = None

    def forward_for(self, mode: Mode) -> nn.Module:
        """The model, or its compiled wrapper (one per model, specialised per keep rate and mode)."""
        if not mode.compiled:
            return self.model
        if self.compiled is None:
            self.compiled = torch.compile(self.model, dynamic=False)
        return self.compiled


def build_trainables(model_name: str, device: torch.device, semantic: bool = False) -> dict[str, Trainable]:
    """timm's dense ViT, one trivit ViT (pruning at 1/4, 1/2 and 3/4 of the depth: blocks 3, 6, 9 of
    12, 6, 12, 18 of ViT-L's 24) whose keep rates each variant sets, and with ``semantic`` the trivit
    ViT with 16 semantic tokens, by :attr:`Variant.trainable`.

    Two or three models in all, whatever the number of variants: ten copies of deit_base with
    AdamW states would not fit a 24 GiB machine.
    """
    torch.manual_seed(0)
    models = {"timm": timm.create_model(model_name), "trivit": create_vit(model_name)}
    if semantic:
        models["semantic"] = create_vit(model_name, {"semantic": {"num_tokens": SEMANTIC_TOKENS}})
    return {kind: Trainable(model.to(device).train(), torch.optim.AdamW(model.parameters(), lr=1e-4))
            for kind, model in models.items()}


class Runner:
    """One variant: the trainable it runs on, its keep rates and (for the example level) statistics."""

    def __init__(self, variant: Variant, trainables: dict[str, Trainable], batch: int, device: torch.device,
                 mode: Mode = Mode()):
        self.variant, self.device, self.mode, self.amp_dtype = variant, device, mode, mode.amp_dtype
        trainable = trainables[variant.trainable]
        self.model, self.optimizer = trainable.model, trainable.optimizer
        self.forward = trainable.forward_for(mode)
        self.stats = ExampleStats(batch * 100, device) if variant.removed else None
        generator = torch.Generator().manual_seed(0)
        size = self.model.patch_embed.img_size
        self.images = torch.randn(batch, 3, *size, generator=generator).to(device)
        self.labels = torch.randint(0, self.model.num_classes, (batch,), generator=generator).to(device)
        self.targets = smoothed_targets(self.labels, self.model.num_classes, 0.1)
        self.ids = torch.arange(batch, device=device)

    def activate(self) -> None:
        """Put the shared model in this variant's state (checkpointing, keep rates)."""
        self.model.set_grad_checkpointing(self.mode.checkpointing)
        if self.variant.timm_dense:
            return
        self.model.blocks.explicit_attention = self.mode.explicit_attention
        set_keep_rates(self.model, self.variant.tokens, self.variant.attention)

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.stats is None:
                logits = self.forward(self.images)
            else:  # the example level scores the samples by the last block's [CLS] attention
                logits, tapped = self.forward(self.images, taps=TapRequest(cls_attention=True))
        losses = per_sample_cross_entropy(logits, self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        self.optimizer.step()
        if self.stats is not None:
            self.stats.update(self.ids, logits.detach(), self.labels, tapped.cls_attention,
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
        """Bytes of the tensors autograd saves for backward in one forward pass (eager, in the mode's
        precision and checkpointing: a compiled graph saves what its partitioner chooses)."""
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        self.activate()
        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
              torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)):
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
                  warmup: int, device: torch.device, modes: tuple[Mode, ...] = (Mode(),)) -> list[Measured]:
    """Every variant in every mode, on two shared models; the rounds interleave all of them."""
    trainables = build_trainables(model_name, device, semantic=any(v.semantic for v in variants))
    if any(mode.compiled for mode in modes):  # one graph per variant and mode, none falling back to eager
        raise_recompile_limit(4 * len(variants) * len(modes))
    pairs = [(mode, variant) for mode in modes for variant in variants]
    runners = [Runner(variant, trainables, batch, device, mode) for mode, variant in pairs]
    results = [Measured(variant, mode) for mode, variant in pairs]
    for runner, result in zip(runners, results):
        start = time.perf_counter()
        result.flops_analytic, result.flops_counted = runner.flops_per_image()
        result.saved_activation_bytes = runner.saved_activation_bytes()
        result.peak_cuda_bytes = runner.peak_cuda_bytes()
        if warmup:
            runner.timed(warmup)
        log.info("%s, %s, %s: ready in %.0f s (compiling, if compiled, and %d warm-up steps)", model_name,
                 runner.mode.name, runner.variant.name, time.perf_counter() - start, warmup)
    for _ in range(repeats):
        for runner, result in zip(runners, results):
            result.step_seconds.append(runner.timed(steps))
    return results


def summary_rows(model_name: str, batch: int, results: list[Measured]) -> list[dict[str, Any]]:
    """One row per variant and mode; speed-ups over timm dense in the same mode, and each variant's
    speed over itself in the first mode (``vs_first_mode``: compiled over eager, say)."""
    medians = {(r.mode, r.variant): statistics.median(r.step_seconds) for r in results}
    first_mode = results[0].mode
    rows = []
    for result in results:
        variant, mode = result.variant, result.mode
        dense = next(r for r in results if r.mode == mode and r.variant.timm_dense)
        median = medians[mode, variant]
        epoch_share = 1 - variant.removed
        rows.append({
            "model": model_name, "mode": mode.name, "variant": variant.name, "batch": batch,
            "img_per_s": batch / median, "img_per_s_min": batch / max(result.step_seconds),
            "img_per_s_max": batch / min(result.step_seconds),
            "step_speedup": medians[mode, dense.variant] / median,
            "epoch_speedup": medians[mode, dense.variant] / median / epoch_share,
            "vs_first_mode": medians[first_mode, variant] / median,
            "flops_ceiling": dense.flops_analytic / (result.flops_analytic * epoch_share),
            "gflops_analytic": result.flops_analytic / 1e9, "gflops_counted": result.flops_counted / 1e9,
            "saved_activations_mb": result.saved_activation_bytes / 2**20,
            "peak_cuda_mb": result.peak_cuda_bytes / 2**20 if result.peak_cuda_bytes is not None else None,
            "step_seconds": result.step_seconds, "variant_spec": asdict(variant),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    first_mode = rows[0]["mode"] if rows else ""
    lines = ["| model | mode | variant | img/s (median) | min-max | step speed-up | epoch speed-up | FLOPs ceiling | "
             f"vs {first_mode} | GFLOPs/img (analytic / counted) | activations MB | peak CUDA MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['variant']} | {r['img_per_s']:.1f} | {r['img_per_s_min']:.1f}-"
                     f"{r['img_per_s_max']:.1f} | {r['step_speedup']:.2f}x | {r['epoch_speedup']:.2f}x | "
                     f"{r['flops_ceiling']:.2f}x | {r['vs_first_mode']:.2f}x | {r['gflops_analytic']:.2f} / "
                     f"{r['gflops_counted']:.2f} | {r['saved_activations_mb']:.0f} | {peak} |")
    return "\n".join(lines)


def overheads(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per model and mode: the attention level's step time over tokens-only, and the example level's
    bookkeeping per step over the same blocks without it (in %), where those variants ran."""
    pairs = {"attention 0.2 on top of tokens 0.7": ("tokens 0.7 + attention 0.2", "tokens 0.7"),
             "example-level bookkeeping per step": ("examples 20%", "dense (trivit blocks)")}
    found = {}
    for model, mode in dict.fromkeys((r["model"], r.get("mode", "")) for r in rows):
        seconds = {r["variant"]: statistics.median(r["step_seconds"]) for r in rows
                   if r["model"] == model and r.get("mode", "") == mode}
        label = f"{model} ({mode})" if mode else model
        for name, (variant, base) in pairs.items():
            if variant in seconds and base in seconds:
                found[f"{label}: {name}"] = 100 * (seconds[variant] / seconds[base] - 1)
    return found


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(len(models), 1, figsize=(8, 0.4 * len(rows) + 2.2 * len(models)), squeeze=False)
    for axis, model in zip(axes[:, 0], models):
        mine = [r for r in rows if r["model"] == model]
        positions = range(len(mine))
        axis.barh([p + 0.2 for p in positions], [r["epoch_speedup"] for r in mine], height=0.4, label="measured")
        axis.barh([p - 0.2 for p in positions], [r["flops_ceiling"] for r in mine], height=0.4, alpha=0.5,
                  label="FLOPs ceiling")
        axis.set_yticks(list(positions), [f"{r['variant']} ({r['mode']})" for r in mine])
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_title(f"{model}: speed-up over timm dense in the same mode (per epoch)")
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def resolve_modes(compile: str, checkpointing: str, precisions: list[str], device: torch.device,
                  attention: str = "fused") -> tuple[Mode, ...]:
    """The modes of ``--compile``/``--checkpointing`` (off, on, both), ``--precision`` (auto: bf16 on a
    GPU that has it, else fp32) and ``--attention`` (fused, explicit, both), eager before compiled, plain
    before checkpointed, fused before explicit."""
    choices = {"off": [False], "on": [True], "both": [False, True]}
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtypes = [PRECISION_DTYPES["bf16" if cuda_bf16 else "fp32"] if p == "auto" else PRECISION_DTYPES[p]
              for p in precisions]
    if torch.float16 in dtypes and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    paths = {"fused": [False], "explicit": [True], "both": [False, True]}[attention]
    return tuple(Mode(c, k, d, e) for d in dict.fromkeys(dtypes) for c in choices[compile]
                 for k in choices[checkpointing] for e in paths)


def bench_speed(models: list[str], batch: int, repeats: int, steps: int, warmup: int, out: Path,
                variants: tuple[Variant, ...] = VARIANTS, modes: tuple[Mode, ...] | None = None) -> list[dict[str, Any]]:
    """Measure every model, print the table and overheads, write ``speed.{md,json,png}`` under ``out``."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    modes = modes or resolve_modes("off", "off", ["auto"], device)
    machine = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    for model in models:
        results = measure_model(model, variants, batch, repeats, steps, warmup, device, modes)
        rows += summary_rows(model, batch, results)
    header = (f"{machine}; modes: {', '.join(m.name for m in modes)}; batch {batch}; {repeats} interleaved repeats "
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
