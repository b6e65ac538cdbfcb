"""The study at 196 tokens: every method side by side, at equal epochs and by time to accuracy.

The demo data at 196 patches (Fashion-MNIST at 56 px, 4 px patches; half the training set, all the
test set) and a 64-wide 6-block ViT (configs/study196/), 2 epochs, each run evaluated every third of
an epoch. Variants, through the real
CLI, one after the other, seeds outermost (every variant of a seed sees the machine of the same
period):

- ``dense``, ``tokens`` (0.7), ``tokens_attention`` (0.7, 0.2), ``trilevel`` (+ the forgetting
  policy), ``semantic`` (16 semantic tokens): one config each, configs/study196/<variant>.yaml;
- ``pruned``: the seed's dense run pruned to half its block latency (``trivit prune``, NViT; one
  latency table measured here first), then fine-tuned for 1 epoch; its time counts the dense
  run, the pruning run and the fine-tuning;
- ``<best>+uskd``: the sparse configuration with the best top-1 on the first seed (or ``--distil``)
  with USKD (no teacher to train first), on every seed.

Two measures. (a) Equal epochs: final test top-1, the training time (``train_s``: the seconds in
training steps; evaluations and checkpoints left out) and the whole run's wall-clock. (b) Time to
accuracy, from each run's evaluation curve against its training time: the time at which it first
reaches its seed's dense run's final top-1 (never reached is reported as such), and the best top-1
it reaches within the dense run's training time. Outputs: a Markdown table on stdout and
``<out>/study196.{md,json,png}``.

    python benchmarks/study196.py --seeds 0 1 --out benchmarks/results/study196
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from trivit.datasets.config import DataConfig
from trivit.datasets.shards import INDEX_NAME, read_index, split_entry, write_index
from trivit.datasets.sources import prepare_source
from trivit.engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "study196"
PLAIN = ("dense", "tokens", "tokens_attention", "trilevel", "semantic")
FOR_USKD = {"semantic": ("cls", ["sparsity.semantic.head=cls"])}
"""USKD's weak classifier reads the [CLS] output of block int(depth / 2) - 1, the STGM's first block here,
which the semantic head 'gap' drops: with USKD the semantic variant carries [CLS] through (head 'cls')."""
HALF_SHARDS = 6
"""The study trains on the first 6 of Fashion-MNIST's 12 training shards (30,000 images)."""


def half_training_set() -> Path:
    """``<cache>/fashion-mnist-half``: the first 6 training shards and all the test shards (the configs name it)."""
    return training_subset(HALF_SHARDS, None, "half")


def training_subset(train_shards: int, test_shards: int | None, name: str | None = None) -> Path:
    """``<cache>/fashion-mnist-<name>``: the first training shards and the first (None: all) test shards of the
    built-in source (hard links), with an index of their own. The example level needs an index that lists
    exactly the shards a run trains on (its table has an entry per id)."""
    full = prepare_source("fashion-mnist", DataConfig().cache_dir)
    subset = full.with_name(f"{full.name}-{name or f'train{train_shards}-test{test_shards}'}")
    if (subset / INDEX_NAME).is_file():
        return subset
    index = read_index(full / INDEX_NAME)
    train, test = index["splits"]["train"], index["splits"]["test"]
    shards, counts = train["shards"][:train_shards], train["counts"][:train_shards]
    tests, test_counts = test["shards"][:test_shards], test["counts"][:test_shards]
    subset.mkdir(exist_ok=True)
    for shard in shards + tests:
        if not (subset / shard).exists():
            os.link(full / shard, subset / shard)
    write_index(subset, {"train": split_entry(shards, counts), "test": split_entry(tests, test_counts)},
                index["classes"])
    return subset


def cli(*args: str) -> float:
    """Run ``trivit ARGS``; returns its wall-clock seconds."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trivit", *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"trivit {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def train(config: str, run_dir: Path, seed: int, overrides: list[str]) -> float:
    """Train ``configs/study196/<config>.yaml`` into ``run_dir`` (unless done: its wall-clock is kept beside it)."""
    timing = run_dir / "wall_clock_s.json"
    if not timing.is_file():
        seconds = cli("train", "--config", str(CONFIGS / f"{config}.yaml"), f"run_dir={run_dir}", f"seed={seed}",
                      "resume=never", "logging.progress_bar=false", *overrides)
        timing.write_text(json.dumps(seconds))
    return json.loads(timing.read_text())


def curve(run_dir: Path, offset: float = 0.0) -> list[tuple[float, float]]:
    """(training seconds, test top-1) of each evaluation of the run, its training time shifted by ``offset``."""
    return [(offset + r["train_s"], r["eval_top1"]) for r in read_metrics(run_dir) if "eval_top1" in r]


def trained_seconds(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir) if "train_s" in r][-1]["train_s"]


def dense_steps_of_flops(run_dir: Path) -> float:
    """The run's training FLOPs in dense steps: its logged per-step FLOPs fractions (every
    ``logging.every_steps``; trapezoids between them) summed over its steps."""
    total, step, fraction = 0.0, 0, 1.0
    for record in read_metrics(run_dir):
        if "flops_fraction" in record and record["step"] > step:
            total += (record["step"] - step) * (fraction + record["flops_fraction"]) / 2
            step, fraction = record["step"], record["flops_fraction"]
    return total


def result(variant: str, seed: int, wall: float, runs: list[Path], final: Path) -> dict:
    """One variant's run (or chain of runs, ``runs`` in order): its final figures and its curve. A
    chain's FLOPs are not summed (a pruned model's fractions are of its own dense FLOPs)."""
    offset, points = 0.0, []
    for run_dir in runs:
        points = curve(run_dir, offset) if run_dir == final else points
        offset += trained_seconds(run_dir)
    last = [r for r in read_metrics(final) if "eval_top1" in r][-1]
    return {"variant": variant, "seed": seed, "top1": last["eval_top1"], "train_s": offset, "wall_s": wall,
            "steps": last["step"], "flops_in_dense_steps": dense_steps_of_flops(final) if len(runs) == 1 else None,
            "active_samples": last.get("active_samples"), "curve": points}


def latency_table(out: Path) -> Path:
    """The study model's block latency table, measured once on this machine."""
    table = out / "latency_table.json"
    if not table.is_file():
        cli("bench", "latency-table", "--config", str(CONFIGS / "dense.yaml"), "--out", str(table))
    return table


def run_seed(seed: int, args: argparse.Namespace, runs: Path, out: Path) -> list[dict]:
    """The plain variants and the pruned model of one seed."""
    rows, extra = [], list(args.set)
    for variant in PLAIN:
        run_dir = runs / f"{variant}_seed{seed}"
        rows.append(result(variant, seed, train(variant, run_dir, seed, extra), [run_dir], run_dir))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    dense = runs / f"dense_seed{seed}"
    pruned, finetuned = runs / f"prune_seed{seed}", runs / f"pruned_seed{seed}"
    timing = pruned / "wall_clock_s.json"
    if not timing.is_file():
        seconds = cli("prune", "--config", str(CONFIGS / "prune.yaml"), "--from", str(dense), "--target-latency",
                      str(args.target_latency), "--latency-table", str(latency_table(out)), "--out", str(pruned),
                      f"seed={seed}", "logging.progress_bar=false")
        timing.write_text(json.dumps(seconds))
    wall = train("dense", dense, seed, extra) + json.loads(timing.read_text())
    wall += train("pruned_finetune", finetuned, seed, [f"model.init_from={pruned}", *extra])
    rows.append(result("pruned", seed, wall, [dense, pruned, finetuned], finetuned))
    return rows


def run_distilled(variant: str, seed: int, args: argparse.Namespace, runs: Path) -> list[dict]:
    """``variant`` with USKD (no teacher to train first). A variant that USKD needs changed
    (``FOR_USKD``) is also trained so changed without USKD, to tell the two changes apart."""
    change, overrides = FOR_USKD.get(variant, ("", []))
    label, rows = f"{variant}/{change}" if change else variant, []
    if change:
        run_dir = runs / f"{variant}_{change}_seed{seed}"
        wall = train(variant, run_dir, seed, [*overrides, *args.set])
        rows.append(result(label, seed, wall, [run_dir], run_dir))
    run_dir = runs / f"{label.replace('/', '_')}_uskd_seed{seed}"
    wall = train(variant, run_dir, seed, ["distill.loss=uskd", *overrides, *args.set])
    return [*rows, result(f"{label}+uskd", seed, wall, [run_dir], run_dir)]


def best_variant(rows: list[dict]) -> str:
    """The sparse configuration (dense and the pruned chain left out) with the best final top-1 in ``rows``."""
    return max((r for r in rows if r["variant"] in PLAIN[1:]), key=lambda r: r["top1"])["variant"]


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    """The training time of the first evaluation at or above ``target``; None if none is."""
    return next((seconds for seconds, top1 in points if top1 >= target), None)


def best_within(points: list[tuple[float, float]], budget: float) -> float | None:
    """The best top-1 of the evaluations within ``budget`` training seconds; None if none is."""
    within = [top1 for seconds, top1 in points if seconds <= budget + 1e-9]
    return max(within) if within else None


def summarise(rows: list[dict]) -> list[dict]:
    """Per variant, over the seeds: the equal-epoch figures, and time to accuracy against each seed's dense run."""
    dense = {r["seed"]: r for r in rows if r["variant"] == "dense"}
    summary = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        reached = [time_to(r["curve"], dense[r["seed"]]["top1"]) for r in mine]
        within = [best_within(r["curve"], dense[r["seed"]]["train_s"]) for r in mine]
        summary.append({
            "variant": variant, "seeds": len(mine),
            "top1": statistics.mean(r["top1"] for r in mine), "top1_min": min(r["top1"] for r in mine),
            "top1_max": max(r["top1"] for r in mine),
            "top1_vs_dense": statistics.mean(r["top1"] - dense[r["seed"]]["top1"] for r in mine),
            "train_s": statistics.mean(r["train_s"] for r in mine),
            "train_speedup": statistics.mean(dense[r["seed"]]["train_s"] / r["train_s"] for r in mine),
            "wall_s": statistics.mean(r["wall_s"] for r in mine),
            "flops_ceiling": (None if mine[0]["flops_in_dense_steps"] is None else statistics.mean(
                dense[r["seed"]]["steps"] / r["flops_in_dense_steps"] for r in mine)),
            "time_to_dense_top1": [None if t is None else round(t, 1) for t in reached],
            "speedup_to_dense_top1": [None if t is None else dense[r["seed"]]["train_s"] / t
                                      for r, t in zip(mine, reached)],
            "best_within_dense_time": [None if b is None else round(b, 2) for b in within],
        })
    return summary


def markdown(summary: list[dict], seeds: list[int]) -> str:
    def each(values: list, form: str) -> str:
        return " / ".join("never" if v is None else format(v, form) for v in values)

    lines = [f"Seeds {seeds}; per seed, time to accuracy is against that seed's dense run (its final top-1 and "
             "training time); 'never' = not reached within the run.", "",
             "| variant | top-1 % (min-max) | vs dense | training s | speed-up | FLOPs ceiling | run wall-clock s | "
             "training s to dense top-1 (per seed) | speed-up to dense top-1 | best top-1 within dense's time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ceiling = "-" if s["flops_ceiling"] is None else f"{s['flops_ceiling']:.2f}x"
        lines.append(f"| {s['variant']} | {s['top1']:.2f} ({s['top1_min']:.2f}-{s['top1_max']:.2f}) | "
                     f"{s['top1_vs_dense']:+.2f} | {s['train_s']:.0f} | {s['train_speedup']:.2f}x | {ceiling} | "
                     f"{s['wall_s']:.0f} | "
                     f"{each(s['time_to_dense_top1'], '.0f')} | {each(s['speedup_to_dense_top1'], '.2f')} | "
                     f"{each(s['best_within_dense_time'], '.2f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], summary: list[dict], path: Path) -> None:
    """(a) top-1 against training time at equal epochs; (b) every run's evaluation curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (equal, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, s in enumerate(summary):
        color = f"C{index}"
        mine = [r for r in rows if r["variant"] == s["variant"]]
        equal.scatter([r["train_s"] / 60 for r in mine], [r["top1"] for r in mine], color=color, alpha=0.7,
                      label=s["variant"])
        for number, r in enumerate(mine):
            curves.plot([t / 60 for t, _ in r["curve"]], [a for _, a in r["curve"]], color=color, marker=".",
                        alpha=0.7, label=s["variant"] if number == 0 else None)
    for dense in (r for r in rows if r["variant"] == "dense"):
        curves.axhline(dense["top1"], color="grey", linewidth=0.5)
    equal.set_title("(a) equal epochs: final top-1 against training time")
    curves.set_title("(b) time to accuracy: top-1 during training (grey: dense final)")
    save_time_plot(figure, (equal, curves), path)


def save_time_plot(figure, panels, path: Path) -> None:
    """Label every panel as top-1 against training time, and write the figure to ``path``."""
    for axes in panels:
        axes.set_xlabel("training time (min)")
        axes.set_ylabel("Fashion-MNIST test top-1 (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--distil", choices=PLAIN[1:],
                        help="the variant also trained with USKD (default: the best top-1 of the first seed)")
    parser.add_argument("--target-latency", type=float, default=0.5, help="the pruned model's block latency target")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every training run (e.g. schedule.max_steps=20 for a quick check)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study196")
    args = parser.parse_args()
    out = args.out.resolve()
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    half_training_set()
    rows, distil = [], args.distil
    for seed in args.seeds:
        rows += run_seed(seed, args, runs, out)
        distil = distil or best_variant(rows)
        rows += run_distilled(distil, seed, args, runs)
    summary = summarise(rows)
    table = markdown(summary, args.seeds)
    print(table)
    (out / "study196.md").write_text(table + "\n")
    (out / "study196.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=1) + "\n")
    plot(rows, summary, out / "study196.png")


if __name__ == "__main__":
    main()
