"""The NViT study on the demo: prune a trained model to half its block latency, fine-tune it, and compare it
with the dense model and with the model shrunk uniformly to the same latency (the paper's comparison).

Per seed, through the real CLI, one after the other:

1. ``dense``: the demo recipe (configs/demo.yaml);
2. ``trivit prune`` of it to ``--target`` of its block latency (configs/demo_prune.yaml), with one
   latency table measured here first (``trivit bench latency-table``);
3. ``nvit lambda=L``: the pruned model (one per ``--latency-weights``) fine-tuned ``--finetune-epochs``
   (the demo recipe at base_lr 1e-3);
4. ``uniform``: every block and the embedding shrunk by one factor, the largest whose table
   latency meets the same target; its units are the dense model's of largest L1 norm (unit by
   unit, in every block alike), fine-tuned the same way.

Reported per model: test top-1 (mean, min-max over seeds), parameters, analytic FLOPs, table
latency, inference img/s (batch 500) and training-step time (batch 128, AdamW) of the three
models timed side by side in one process (medians of interleaved rounds), and the per-block widths
(``<out>/prune_study.png``, like the paper's figure of the redistribution).
Outputs: a Markdown table on stdout and ``<out>/prune_study.{md,json,png}``.

    python benchmarks/prune_study.py --seeds 0 1 --latency-weights 1 0.25 --out benchmarks/results/nvit
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.workflows.prune import full_widths
from trivit.sparse.flops import model_flops
from trivit.sparse.latency import LatencyTable, interleaved_medians
from trivit.sparse.nvit import group_sizes, kind_of
from trivit.sparse.pruned import PrunedArch, add_unit_sums, create_pruned_vit, strip_state, unit_axes

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trivit", *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"trivit {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def train(config: Path, run_dir: Path, seed: int, *overrides: str) -> None:
    if not (run_dir / "model.safetensors").is_file():
        cli("train", "--config", str(config), f"run_dir={run_dir}", f"seed={seed}", "logging.progress_bar=false",
            *overrides)


def uniform_arch(full: PrunedArch, table: LatencyTable, target: float) -> PrunedArch:
    """Every width times one factor (at least one group of each), the largest factor meeting ``target``."""
    sizes = group_sizes(full)
    base_ms = table.model_ms(full)

    def scaled(factor: float) -> PrunedArch:
        counts = {g: max(sizes[kind_of(g)], round(n * factor / sizes[kind_of(g)]) * sizes[kind_of(g)])
                  for g, n in full.unit_counts().items()}
        return full.with_counts(counts)

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if table.model_ms(scaled(middle)) <= target * base_ms else (low, middle)
    return scaled(low)


def magnitude_masks(weights: dict[str, torch.Tensor], full: PrunedArch, arch: PrunedArch,
                    model_kwargs: dict) -> dict[str, torch.Tensor]:
    """Per group, keep ``arch``'s count of the units whose tied weights have the largest L1 norm."""
    with torch.device("meta"):
        model = create_pruned_vit(full, **model_kwargs)
    norms = {g: torch.zeros(n, dtype=torch.float64) for g, n in full.unit_counts().items()}
    for name, axes in unit_axes(model, full).items():
        if name not in weights:
            continue
        add_unit_sums(norms, weights[name].abs().double(), axes)
    kept = arch.unit_counts()
    masks = {}
    for group, norm in norms.items():
        mask = torch.zeros(len(norm))
        mask[norm.argsort(descending=True)[:kept[group]]] = 1
        masks[group] = mask
    return masks


def write_uniform(dense: Path, arch: PrunedArch, full: PrunedArch, model_kwargs: dict, out: Path) -> Path:
    weights = load_file(dense / "model.safetensors")
    with torch.device("meta"):
        model = create_pruned_vit(full, **model_kwargs)
    masks = magnitude_masks(weights, full, arch, model_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    save_file(strip_state(weights, unit_axes(model, full), masks), str(out / "model.safetensors"))
    arch.save(out / "arch.json")
    return out / "model.safetensors"


def load_model(run_dir: Path, arch: PrunedArch, model_kwargs: dict) -> torch.nn.Module:
    model = create_pruned_vit(arch, **model_kwargs)
    model.load_state_dict(load_file(run_dir / "model.safetensors"), strict=True)
    return model


def speeds(models: dict[str, torch.nn.Module], image_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Inference img/s (batch 500) and training-step seconds (batch 128, AdamW) of every model, the
    median of ``repeats`` rounds that time each model once, in this one process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inference_batch = torch.randn(500, 1, image_size, image_size, device=device)
    train_batch = torch.randn(128, 1, image_size, image_size, device=device)
    labels = torch.randint(0, 10, (128,), device=device)
    runs = []
    for model in models.values():
        model = model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def infer(model=model) -> None:
            model.eval()
            with torch.no_grad():
                model(inference_batch)

        def step(model=model, optimizer=optimizer) -> None:
            model.train()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(train_batch), labels).backward()
            optimizer.step()

        runs += [infer, step]
    medians = interleaved_medians(runs, repeats, device)
    return {name: {"inference_img_per_s": 500 / (medians[2 * i] / 1e3), "train_step_s": medians[2 * i + 1] / 1e3}
            for i, name in enumerate(models)}


def final_top1(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir) if "eval_top1" in r][-1]["eval_top1"]


def per_block_figure(archs: dict[str, PrunedArch], out: Path) -> None:
    """Each block's attention width (heads x query/key + heads x value) and MLP width, per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(archs)
    for offset, (name, arch) in enumerate(archs.items()):
        shift = [b + width * (offset - (len(archs) - 1) / 2) for b in range(len(arch.blocks))]
        axes[0].bar(shift, [b.heads * (b.qk_dim + b.v_dim) for b in arch.blocks], width=width,
                    label=f"{name} (embedding {arch.embed_dim})")
        axes[1].bar(shift, [b.mlp_dim for b in arch.blocks], width=width, label=name)
    axes[0].set_title("attention: heads x (query/key + value) channels")
    axes[1].set_title("MLP units")
    for axis in axes:
        axis.set_xlabel("block")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--latency-weights", type=float, nargs="+", default=[1.0],
                        help="prune.latency_weight (lambda) of each pruned model")
    parser.add_argument("--saliencies", nargs="+", choices=["paper", "code"], default=["paper"],
                        help="prune.saliency of the pruned models: paper (one per --latency-weights) and/or code "
                             "(the authors' reading, its own lambda)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "nvit")
    args = parser.parse_args()
    out = args.out.resolve()
    runs = out / "runs"
    config = load(TrainConfig, DEMO, [])
    model_kwargs = dict(config.model.timm_arguments(), num_classes=10, drop_path_rate=0.0)
    full = full_widths(config, 10)
    table_path = out / "latency_table.json"
    if not table_path.is_file():
        cli("bench", "latency-table", "--config", str(DEMO), "--batch", "128", "--out", str(table_path))
    table = LatencyTable.load(table_path)
    uniform = uniform_arch(full, table, args.target)
    finetune = [f"schedule.epochs={args.finetune_epochs}", "schedule.warmup_epochs=0.05", "optim.base_lr=1.0e-3"]
    rows = []
    for seed in args.seeds:
        dense, shrunk = runs / f"dense_seed{seed}", runs / f"uniform_seed{seed}"
        train(DEMO, dense, seed)
        archs, dirs, prune_steps = {"dense": full}, {"dense": dense}, {}
        for saliency, weight in pruning_variants(args.saliencies, args.latency_weights):
            tag = f"lw{weight:g}" if saliency == "paper" else "code"
            name = f"nvit lambda={weight:g}" if saliency == "paper" else "nvit code"
            pruned = runs / f"pruned_{tag}_seed{seed}"
            if not (pruned / "arch.json").is_file():
                cli("prune", "--config", str(ROOT / "configs" / "demo_prune.yaml"), "--from", str(dense),
                    "--target-latency", str(args.target), "--latency-table", str(table_path), "--out", str(pruned),
                    f"seed={seed}", "logging.progress_bar=false", f"prune.latency_weight={weight}",
                    f"prune.saliency={saliency}")
            archs[name], dirs[name] = PrunedArch.load(pruned / "arch.json"), runs / f"nvit_{tag}_seed{seed}"
            train(DEMO, dirs[name], seed, f"model.init_from={pruned}", *finetune)
            prune_steps[name] = json.loads((pruned / "prune.json").read_text())["steps"]
        start = write_uniform(dense, uniform, full, model_kwargs, runs / f"uniform_start_seed{seed}")
        train(DEMO, shrunk, seed, f"model.init_from={start}", *finetune)
        archs["uniform"], dirs["uniform"] = uniform, shrunk
        models = {name: load_model(dirs[name], archs[name], model_kwargs) for name in archs}
        timed = speeds(models, config.model.img_size, args.repeats)
        for name, model in models.items():
            rows.append({"model": name, "seed": seed, "top1": final_top1(dirs[name]),
                         "params": sum(p.numel() for p in model.parameters()), "flops": model_flops(model),
                         "latency_fraction": table.model_ms(archs[name]) / table.model_ms(full),
                         "prune_steps": prune_steps.get(name), **timed[name], "arch": dataclasses.asdict(archs[name])})
    first = {r["model"]: PrunedArch(**r["arch"]) for r in rows if r["seed"] == args.seeds[0]}
    per_block_figure(first, out / "prune_study.png")
    summary = summarise(rows, args.finetune_epochs, args.target)
    (out / "prune_study.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")
    (out / "prune_study.md").write_text(summary + "\n")
    print(summary)


def pruning_variants(saliencies: list[str], latency_weights: list[float]) -> list[tuple[str, float]]:
    """(prune.saliency, prune.latency_weight) of each pruned model: ``paper`` at every weight, ``code`` once
    (it prices latency by prune.code_latency_weight)."""
    return [(s, w) for s in saliencies for w in (latency_weights if s == "paper" else latency_weights[:1])]


def summarise(rows: list[dict], finetune_epochs: int, target: float) -> str:
    lines = [f"Demo (Fashion-MNIST, 4-block ViT, 128 wide), pruned to {target} of the block latency (NViT) and "
             f"fine-tuned {finetune_epochs} epochs, against dense (4 epochs) and a uniform shrink to the same latency "
             f"(fine-tuned the same); seeds {sorted({r['seed'] for r in rows})}.", "",
             "| model | top-1 (mean, min-max) | params | FLOPs | table latency | inference img/s | vs dense | "
             "train step s | vs dense |", "|---|---|---|---|---|---|---|---|---|"]
    dense = [r for r in rows if r["model"] == "dense"]
    dense_inference = statistics.mean(r["inference_img_per_s"] for r in dense)
    dense_step = statistics.mean(r["train_step_s"] for r in dense)
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        top1 = [r["top1"] for r in mine]
        inference = statistics.mean(r["inference_img_per_s"] for r in mine)
        step = statistics.mean(r["train_step_s"] for r in mine)
        params, flops = (statistics.mean(r[key] for r in mine) for key in ("params", "flops"))
        latency = statistics.mean(r["latency_fraction"] for r in mine)
        lines.append(f"| {name} | {statistics.mean(top1):.2f} ({min(top1):.2f}-{max(top1):.2f}) | "
                     f"{params / 1e6:.3f}M | {flops / 1e6:.1f}M | "
                     f"{latency:.3f} | {inference:.0f} | {inference / dense_inference:.2f}x | "
                     f"{step:.4f} | {dense_step / step:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
