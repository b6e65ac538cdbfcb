"""The accuracy study: dense, each sparsity level alone, and all three, on the demo data, one epoch budget;
or dense against distillation (NKD from a stronger teacher, USKD from none).

Each variant is one config under configs/study/, trained through the real CLI, one after the
other, for every seed; the script reports test top-1 (mean and spread over seeds), wall-clock
time of the whole run (training and its evaluations) and both as ratios to dense, and draws
accuracy against time (the paper's figure 1). Outputs: a Markdown table on stdout and
``<out>/accuracy_study.{md,json,png}``.

    python benchmarks/accuracy_study.py --seeds 0 1 --out benchmarks/results
    python benchmarks/accuracy_study.py --seeds 0 1 --variants dense nkd uskd \
        --teacher runs/demo_teacher --name distill_study

    python benchmarks/accuracy_study.py --seeds 0 1 --variants demo196_dense demo196_semantic \
        --reference demo196_dense --name semantic_study

A variant is configs/study/<variant>.yaml, or configs/<variant>.yaml. The nkd variant distils a
trained run (``--teacher``: `trivit train --config configs/demo_teacher.yaml`).
The seconds per step are the median over the run's logged steps (the first left out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from trivit.engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("dense", "tokens", "attention", "examples", "trilevel")
VARIANTS = (*LEVELS, "nkd", "uskd", "demo196_dense", "demo196_semantic")


def variant_config(variant: str) -> Path:
    study = ROOT / "configs" / "study" / f"{variant}.yaml"
    return study if study.exists() else ROOT / "configs" / f"{variant}.yaml"


def run_variant(variant: str, seed: int, runs: Path, teacher: Path | None, overrides: list[str]) -> dict:
    run_dir = runs / f"{variant}_seed{seed}"
    command = [sys.executable, "-m", "trivit", "train", "--config", str(variant_config(variant)),
               f"run_dir={run_dir}", f"seed={seed}", "resume=never", "logging.progress_bar=false",
               *([f"distill.teacher={teacher.resolve()}"] if variant == "nkd" else []), *overrides]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{result.stderr[-3000:]}")
    last = read_metrics(run_dir)[-1]
    batch = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["batch_size"]
    step_seconds = [batch / r["img_per_s"] for r in read_metrics(run_dir)[1:] if r.get("img_per_s")]
    return {"variant": variant, "seed": seed, "top1": last["eval_top1"], "seconds": seconds,
            "seconds_per_step": statistics.median(step_seconds),
            "active_samples": last["active_samples"], "flops_fraction": last["flops_fraction"],
            "epoch_flops_fraction": last["epoch_flops_fraction"], "run_dir": str(run_dir)}


def summarise(rows: list[dict], reference: str = "dense") -> list[dict]:
    """Per variant: mean/spread of top-1 and time, and their ratios to the dense ``reference`` ("vs_dense")."""
    by_variant = {v: [r for r in rows if r["variant"] == v] for v in VARIANTS if any(r["variant"] == v for r in rows)}
    dense_top1 = statistics.mean(r["top1"] for r in by_variant[reference])
    dense_time = statistics.mean(r["seconds"] for r in by_variant[reference])
    dense_step = statistics.mean(r["seconds_per_step"] for r in by_variant[reference])
    summary = []
    for variant, runs in by_variant.items():
        top1 = [r["top1"] for r in runs]
        seconds = [r["seconds"] for r in runs]
        summary.append({
            "variant": variant, "seeds": len(runs), "top1_mean": statistics.mean(top1),
            "top1_min": min(top1), "top1_max": max(top1), "seconds_mean": statistics.mean(seconds),
            "top1_vs_dense": statistics.mean(top1) - dense_top1,
            "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in runs),
            "step_cost_vs_dense": statistics.mean(r["seconds_per_step"] for r in runs) / dense_step,
            "speedup_vs_dense": dense_time / statistics.mean(seconds),
            "epoch_flops_fraction": runs[-1]["epoch_flops_fraction"],
            "flops_ceiling": 1 / runs[-1]["epoch_flops_fraction"],
        })
    return summary


def markdown(summary: list[dict]) -> str:
    lines = ["| variant | seeds | test top-1 % (min-max) | vs dense (points) | wall-clock s | speed-up vs dense | "
             "s/step (vs dense) | FLOPs ceiling |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['seeds']} | {s['top1_mean']:.2f} ({s['top1_min']:.2f}-{s['top1_max']:.2f}) | "
                     f"{s['top1_vs_dense']:+.2f} | {s['seconds_mean']:.0f} | {s['speedup_vs_dense']:.2f}x | "
                     f"{s['seconds_per_step']:.3f} ({s['step_cost_vs_dense']:.2f}x) | {s['flops_ceiling']:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], summary: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for s in summary:
        runs = [r for r in rows if r["variant"] == s["variant"]]
        axes.scatter([r["seconds"] / 60 for r in runs], [r["top1"] for r in runs], alpha=0.4)
        axes.annotate(s["variant"], (s["seconds_mean"] / 60, s["top1_mean"]), textcoords="offset points", xytext=(5, 5))
    axes.set_xlabel("wall-clock to the same epoch budget (min)")
    axes.set_ylabel("Fashion-MNIST test top-1 (%)")
    axes.set_title("Accuracy against training time (2 epochs, 2 CPU cores)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(LEVELS), choices=VARIANTS)
    parser.add_argument("--teacher", type=Path, help="the trained run the nkd variant distils")
    parser.add_argument("--reference", default="dense", choices=VARIANTS, help="the dense variant of the ratios")
    parser.add_argument("--name", default="accuracy_study", help="stem of the output files")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every variant, e.g. schedule.max_steps=150 to time steps only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "study")
    args = parser.parse_args()
    if args.reference not in args.variants:
        parser.error(f"the ratios need the reference variant {args.reference!r} among --variants")
    if "nkd" in args.variants and args.teacher is None:
        parser.error("the nkd variant needs --teacher RUN_DIR (train one with configs/demo_teacher.yaml)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:  # seeds outermost: every variant sees the machine's load of the same period
        for variant in args.variants:
            rows.append(run_variant(variant, seed, args.runs, args.teacher, args.set))
            print(json.dumps(rows[-1]), flush=True)
    summary = summarise(rows, args.reference)
    table = markdown(summary)
    print(table)
    (args.out / f"{args.name}.md").write_text(table + "\n")
    (args.out / f"{args.name}.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=1))
    plot(rows, summary, args.out / f"{args.name}.png")


if __name__ == "__main__":
    main()
