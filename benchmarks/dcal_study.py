"""DCAL on the demo: self-attention alone, + GLCA, + PWCA and both, each trained with the demo recipe for the
same epochs; test top-1 overall and on the four upper-body classes Fashion-MNIST's errors concentrate on
(T-shirt/top, pullover, coat, shirt), and the cost of a training step, measured side by side.

Per variant and seed, through the CLI: ``trivit train --config configs/demo.yaml model.dcal...`` and
``trivit eval RUN --keep-rates 1.0 --per-class`` (a DCAL model is evaluated as it predicts: the sum of
its two heads' probabilities). The step cost: the demo model of each variant, one optimizer step of a
demo batch (forward, the objective, backward, AdamW), interleaved, median of ``--repeats``.
Outputs: a Markdown table on stdout and ``<out>/dcal_study.{md,json}``.

    python benchmarks/dcal_study.py --seeds 0 1 --epochs 2 --out benchmarks/results/dcal
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from trivit.config import load
from trivit.datasets.fashion_mnist import CLASSES
from trivit.engine.config import TrainConfig
from trivit.engine.model.build import create_model
from trivit.engine.objectives.base import Objective, split_heads
from trivit.engine.objectives.dcal import DualCrossAttentionObjective
from trivit.engine.objectives.losses import per_sample_cross_entropy, smoothed_targets
from trivit.engine.optim import build_optimizer
from trivit.sparse.latency import interleaved_medians

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
VARIANTS = {"self-attention": [], "+ GLCA": ["model.dcal.glca_top_r=0.1"], "+ PWCA": ["model.dcal.pwca=true"],
            "+ GLCA + PWCA": ["model.dcal.glca_top_r=0.1", "model.dcal.pwca=true"]}
"""GLCA keeps the paper's 10% of the queries (2 of the demo's 16 patches)."""
UPPER_BODY = ("t-shirt/top", "pullover", "coat", "shirt")


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trivit", *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"trivit {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def step_costs(repeats: int) -> dict[str, float]:
    """Median ms of one training step of the demo model, per variant, timed in turn on the CPU."""
    steps = []
    for overrides in VARIANTS.values():
        config = load(TrainConfig, DEMO, overrides)
        torch.manual_seed(0)
        model = create_model(config, len(CLASSES), None).train()
        objective = Objective()
        if config.model.dcal.enabled:
            objective = DualCrossAttentionObjective(objective, config.model.dcal, 0, torch.device("cpu"))
        optimizer = build_optimizer(model, config.optim, config.data.batch_size)
        batch = config.data.batch_size
        images = torch.randn(batch, 1, config.model.img_size, config.model.img_size)
        targets = smoothed_targets(torch.arange(batch) % len(CLASSES), len(CLASSES), config.data.label_smoothing)
        weights = torch.full((batch,), 1 / batch)

        def step(model=model, objective=objective, optimizer=optimizer, images=images, targets=targets,
                 weights=weights, batch=batch) -> None:
            outputs = model(images, **objective.model_inputs(torch.arange(batch), 0))
            losses = per_sample_cross_entropy(split_heads(outputs)[0], targets)
            objective.loss(losses, outputs, images, targets, weights).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps.append(step)
    return dict(zip(VARIANTS, interleaved_medians(steps, repeats, torch.device("cpu"))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant for the step cost")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dcal")
    args = parser.parse_args()
    out = args.out.resolve()
    rows = []
    for seed in args.seeds:
        for name, overrides in VARIANTS.items():
            run = out / "runs" / f"{name.replace(' ', '').replace('+', 'plus_')}_seed{seed}"
            if not (run / "model.safetensors").is_file():
                cli("train", "--config", str(DEMO), f"run_dir={run}", f"seed={seed}", f"schedule.epochs={args.epochs}",
                    "logging.progress_bar=false", *overrides)
            table = run / "eval_per_class.json"
            if not table.is_file():
                cli("eval", str(run), "--keep-rates", "1.0", "--repeats", "1", "--per-class", "--out", str(table))
            result = json.loads(table.read_text())[0]
            per_class = dict(zip(CLASSES, result["top1_per_class"]))
            rows.append({"variant": name, "seed": seed, "top1": result["top1"],
                         "upper_body_top1": statistics.mean(per_class[c] for c in UPPER_BODY),
                         **{f"top1/{c}": per_class[c] for c in UPPER_BODY}})
    costs = step_costs(args.repeats)
    summary = summarise(rows, costs, args.epochs, args.repeats)
    (out / "dcal_study.json").write_text(json.dumps({"runs": rows, "step_ms": costs}, indent=1) + "\n")
    (out / "dcal_study.md").write_text(summary + "\n")
    print(summary)


def summarise(rows: list[dict], costs: dict[str, float], epochs: int, repeats: int) -> str:
    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    base = costs["self-attention"]
    lines = [f"The demo recipe, {epochs} epochs, seeds {sorted({r['seed'] for r in rows})}; Fashion-MNIST test top-1 "
             f"(mean, min-max); step cost: one training step of batch 128 on this CPU, median of {repeats}, interleaved.",
             "", "| variant | top-1 | upper-body classes | " + " | ".join(UPPER_BODY) + " | ms / step | vs self-attention |",
             "|---|---|---|" + "---|" * len(UPPER_BODY) + "---|---|"]
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        classes = " | ".join(spread([r[f"top1/{c}"] for r in mine]) for c in UPPER_BODY)
        lines.append(f"| {name} | {spread([r['top1'] for r in mine])} | {spread([r['upper_body_top1'] for r in mine])} "
                     f"| {classes} | {costs[name]:.1f} | {costs[name] / base:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
