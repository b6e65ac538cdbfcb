"""For a training budget, the best model: every variant at equal training time, at three budgets.

The 196-token set-up of benchmarks/study196.py (Fashion-MNIST at 56 px, 4 px patches, a 64-wide 6-block ViT,
configs/study196/) on the first ``--train-shards`` of the 12 training shards (default 2: 10,000 images) and one
test shard (5,000 images). A budget is training time (``train_s``: seconds inside training steps), measured in
dense epochs on this machine: 1, 2 and 4 (``--budgets``). Dense trains that many epochs; every other variant
trains the epochs that fill the same seconds, from its own measured seconds per epoch (its latest run, else its
longest finished run on disk, else its prior speed-up), so a faster variant trains more epochs. Every schedule scales
with the run's own epochs (warm-up, keep-rate ramp, final dense phase: fractions of the run) and its learning
rate decays to the floor at its own end (Li et al., Budgeted Training). ``schedule.epochs`` takes a fraction.

Variants (``VARIANTS``): dense, tokens 0.7, tokens 0.7 + InfoBatch, the three levels as the paper sets them,
16 semantic tokens, and the sparse-to-dense recipes of configs/recipes/ scaled to the study (tokens 0.7 with
a dense last quarter, tokens 0.5 with a dense last tenth). The recipes also
run at 0.67 of each budget (the target: dense's top-1 in 0.67x of its time). Each model with a token or an
attention level is also evaluated dense (keep rate 1.0: ``trivit eval``), as a user who trains sparse may deploy
dense. Finished runs are kept (``<out>/runs``), so the study may be run in parts.

    python benchmarks/budget_study.py --seeds 0 1 --out benchmarks/results/budget
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from study196 import CONFIGS, cli, dense_steps_of_flops, save_time_plot, training_subset  # benchmarks/study196.py

from trivit.engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = {"paper": (0.05, 0.3, 0.0), "dense end": (0.05, 0.25, 0.25), "short dense end": (0.02, 0.2, 0.1)}
"""Keep-rate schedules as fractions of the run: dense start, cosine span, final dense phase. ``paper``: EViT's
warm-up scaled as configs/study196 scales it (0.1 and 0.6 of 2 epochs); the others: the recipes'."""


@dataclass(frozen=True)
class Variant:
    """One line of the study: its configs/study196 config, overrides, keep-rate schedule (``SCHEDULES``) and the
    speed-up per epoch over dense that sizes its first run (measured in this study; later runs use their own)."""

    config: str
    extra: tuple[str, ...] = ()
    schedule: str = "paper"
    prior_speedup: float = 1.0


INFOBATCH = "sparsity.examples.policy=infobatch"
VARIANTS: dict[str, Variant] = {
    "dense": Variant("dense"),
    "tokens 0.7": Variant("tokens", prior_speedup=1.55),
    "tokens 0.7 + InfoBatch": Variant("tokens", (INFOBATCH,), prior_speedup=1.7),
    "three levels (paper)": Variant("trilevel", prior_speedup=1.47),
    "16 semantic tokens": Variant("semantic", prior_speedup=2.1),
    "recipe: tokens 0.7, dense end": Variant("tokens", schedule="dense end", prior_speedup=1.41),
    "recipe: tokens 0.7 + InfoBatch, dense end": Variant("tokens", (INFOBATCH,), schedule="dense end",
                                                         prior_speedup=1.6),
    "recipe: tokens 0.5, short dense end": Variant("tokens", ("sparsity.tokens.keep_rate=0.5",),
                                                   schedule="short dense end", prior_speedup=1.8),
}
"""The study's lines by label; a recipe is a variant with a final dense phase (a schedule other than the paper's)."""
TARGET_SHARE = 0.67


def recipe(variant: str) -> bool:
    return VARIANTS[variant].schedule != "paper"


def overrides(variant: str, epochs: float, data: Path) -> list[str]:
    """A run of ``variant`` over ``epochs``: its config's settings with the schedules scaled to the run."""
    start, span, final = SCHEDULES[VARIANTS[variant].schedule]
    return [f"data.train_urls={data}", f"data.val_urls={data}", f"schedule.epochs={epochs:g}",
            f"schedule.warmup_epochs={0.1 * epochs:.4g}", "schedule.eval_every_steps=0",
            f"sparsity.schedule.start_epochs={start * epochs:.4g}", f"sparsity.schedule.span_epochs={span * epochs:.4g}",
            f"sparsity.schedule.final_dense_epochs={final * epochs:.4g}", *VARIANTS[variant].extra]


def slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in variant).strip("_").replace("__", "_")


def trained(run_dir: Path) -> dict | None:
    """The run's figures if it finished: training seconds, epochs, final top-1, its evaluation curve."""
    if not (run_dir / "model.safetensors").is_file():
        return None
    records = read_metrics(run_dir)
    steps = [r for r in records if "train_s" in r]
    evals = [r for r in records if "eval_top1" in r]
    train_s = {r["step"]: r["train_s"] for r in steps}
    return {"train_s": steps[-1]["train_s"], "epochs": steps[-1]["epoch"], "top1": evals[-1]["eval_top1"],
            "steps": steps[-1]["step"], "active_samples": steps[-1].get("active_samples"),
            "flops_in_dense_steps": dense_steps_of_flops(run_dir),
            "curve": [(train_s.get(r["step"], steps[-1]["train_s"]), r["epoch"], r["eval_top1"]) for r in evals]}


def dense_top1(run_dir: Path) -> float:
    """The model evaluated at keep rate 1.0 for tokens and attention (``trivit eval``, kept beside the run)."""
    out = run_dir / "dense_eval.json"
    if not out.is_file():
        cli("eval", str(run_dir), "--keep-rates", "1.0", "--attention", "1.0", "--repeats", "1", "--out", str(out))
    return json.loads(out.read_text())[0]["top1"]


def measured_epoch_seconds(runs: Path, variant: str) -> float | None:
    """Seconds per epoch of the variant's longest finished run so far (of any seed), None before its first."""
    finished = [f for f in map(trained, runs.glob(f"{slug(variant)}_b*_seed*")) if f is not None]
    longest = max(finished, key=lambda f: f["epochs"], default=None)
    return longest["train_s"] / longest["epochs"] if longest else None


def run(variant: str, seed: int, budget: float, seconds_per_dense_epoch: float, runs: Path, data: Path,
        per_epoch: dict[str, float], train: bool = True) -> dict | None:
    """``variant`` at ``budget`` dense epochs' training time (its epochs from ``per_epoch``, its measured seconds
    per epoch); the run is kept, and ``per_epoch`` updated from it. ``train=False``: None for a run not finished."""
    config = VARIANTS[variant].config
    if variant == "dense":
        epochs = budget
    else:
        seconds = per_epoch.get(variant) or measured_epoch_seconds(runs, variant) or \
            seconds_per_dense_epoch / VARIANTS[variant].prior_speedup
        epochs = round(budget * seconds_per_dense_epoch / seconds, 2)
    run_dir = runs / f"{slug(variant)}_b{budget:g}_seed{seed}"
    figures = trained(run_dir)
    if figures is None and not train:
        return None
    if figures is None:
        if run_dir.exists():  # a run the study was stopped in (its configs keep no checkpoint to resume)
            shutil.rmtree(run_dir)
        cli("train", "--config", str(CONFIGS / f"{config}.yaml"), f"run_dir={run_dir}", f"seed={seed}",
            "resume=never", "logging.progress_bar=false", *overrides(variant, epochs, data))
        figures = trained(run_dir)
    per_epoch[variant] = figures["train_s"] / figures["epochs"]
    row = {"variant": variant, "seed": seed, "budget": budget, **figures}
    if config in ("tokens", "trilevel"):
        row["top1_dense"] = dense_top1(run_dir)
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return row


def run_seed(seed: int, budgets: list[float], runs: Path, data: Path, per_epoch: dict[str, float],
             train: bool = True) -> list[dict]:
    """Every variant at every budget for ``seed`` (``train=False``: the finished runs only); ``per_epoch`` carries
    each variant's latest measured seconds per epoch (from the previous seed's runs too)."""
    rows = [row for budget in budgets if (row := run("dense", seed, budget, 0.0, runs, data, per_epoch, train))]
    if not rows:
        return []
    dense_epoch_s = statistics.mean(r["train_s"] / r["epochs"] for r in rows)
    for variant in sorted(list(VARIANTS)[1:], key=lambda v: not recipe(v)):  # the recipes first: the target needs them
        shares = [TARGET_SHARE, 1.0] if recipe(variant) else [1.0]
        for budget in budgets:
            for share in shares:
                row = run(variant, seed, round(budget * share, 3), dense_epoch_s, runs, data, per_epoch, train)
                rows += [row] if row else []
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per variant and budget, over the seeds: training seconds, epochs, top-1 (and dense top-1), against dense."""
    dense = {(r["seed"], r["budget"]): r for r in rows if r["variant"] == "dense"}
    dense_epoch_s = statistics.mean(d["train_s"] / d["epochs"] for d in dense.values())
    dense_epoch_steps = statistics.mean(d["steps"] / d["epochs"] for d in dense.values())
    summary = []
    for variant in VARIANTS:
        for budget in sorted({r["budget"] for r in rows if r["variant"] == variant}):
            mine = [r for r in rows if r["variant"] == variant and r["budget"] == budget]
            reference = [dense.get((r["seed"], budget)) for r in mine]  # none at a recipe's 0.67x budgets
            entry = {"variant": variant, "budget": budget, "seeds": [r["seed"] for r in mine],
                     "speedup_per_epoch": statistics.mean(dense_epoch_s * r["epochs"] / r["train_s"] for r in mine),
                     "flops_ceiling": statistics.mean(dense_epoch_steps * r["epochs"] / r["flops_in_dense_steps"]
                                                      for r in mine),
                     "train_s": statistics.mean(r["train_s"] for r in mine),
                     "epochs": statistics.mean(r["epochs"] for r in mine),
                     "top1": [r["top1"] for r in mine],
                     "top1_dense_eval": [r.get("top1_dense") for r in mine],
                     "dense_top1": [d["top1"] if d else None for d in reference],
                     "dense_train_s": [d["train_s"] if d else None for d in reference]}
            summary.append(entry)
    return summary


def target(rows: list[dict], budgets: list[float]) -> list[dict]:
    """Each recipe against the target, per seed and budget: its top-1 at 0.67x of dense's training time (its run at
    0.67 of the budget) against dense's top-1 at the budget."""
    checks = []
    for variant in (v for v in VARIANTS if recipe(v)):
        for seed in sorted({r["seed"] for r in rows}):
            for budget in budgets:
                dense = next((r for r in rows if r["variant"] == "dense" and r["seed"] == seed
                              and r["budget"] == budget), None)
                short = next((r for r in rows if r["variant"] == variant and r["seed"] == seed
                              and math.isclose(r["budget"], round(budget * TARGET_SHARE, 3))), None)
                if dense and short:
                    checks.append({"variant": variant, "seed": seed, "budget": budget, "dense_top1": dense["top1"],
                                   "recipe_top1": short["top1"], "recipe_train_s": short["train_s"],
                                   "dense_train_s": dense["train_s"], "met": short["top1"] >= dense["top1"]})
    return checks


def markdown(summary: list[dict], checks: list[dict], seeds: list[int]) -> str:
    def each(values: list, form: str = ".2f") -> str:
        return " / ".join("-" if v is None else format(v, form) for v in values)

    lines = [f"Seeds {seeds}; values per seed. Budget: training time in dense epochs. 'vs dense': top-1 minus the "
             "same seed's dense run at the same budget. Speed-up per epoch: dense's mean seconds per epoch over the "
             "run's; its FLOPs ceiling from the logged per-step FLOPs fractions.", "",
             "| variant | budget | epochs | training s | speed-up per epoch (FLOPs ceiling) | top-1 % | vs dense | "
             "top-1 evaluated dense (keep 1.0) |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        gaps = [None if d is None else t - d for t, d in zip(s["top1"], s["dense_top1"])]
        lines.append(f"| {s['variant']} | {s['budget']:g} | {s['epochs']:.2f} | {s['train_s']:.0f} | "
                     f"{s['speedup_per_epoch']:.2f}x ({s['flops_ceiling']:.2f}x) | "
                     f"{each(s['top1'])} | {each(gaps, '+.2f')} | {each(s['top1_dense_eval'])} |")
    if checks:
        lines += ["", f"Target: a recipe's top-1 in {TARGET_SHARE}x of dense's training time at least dense's.", "",
                  "| recipe | seed | budget | dense top-1 (s) | recipe top-1 (s) | met |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['variant']} | {c['seed']} | {c['budget']:g} | {c['dense_top1']:.2f} ({c['dense_train_s']:.0f}) "
                  f"| {c['recipe_top1']:.2f} ({c['recipe_train_s']:.0f}) | {'yes' if c['met'] else 'no'} |"
                  for c in checks]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """The frontier: top-1 against training time, a line per variant through its budgets (seeds averaged), the
    seeds' points around it; and the per-epoch curves of the largest budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (frontier, curves) = plt.subplots(1, 2, figsize=(13, 5))
    largest = max(r["budget"] for r in rows)
    for index, variant in enumerate(VARIANTS):
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        color, budgets = f"C{index}", sorted({r["budget"] for r in mine})
        means = [(statistics.mean(r["train_s"] for r in mine if r["budget"] == b),
                  statistics.mean(r["top1"] for r in mine if r["budget"] == b)) for b in budgets]
        frontier.plot([t / 60 for t, _ in means], [a for _, a in means], color=color, marker="o", label=variant)
        frontier.scatter([r["train_s"] / 60 for r in mine], [r["top1"] for r in mine], color=color, alpha=0.35, s=12)
        for number, r in enumerate(r for r in mine if r["budget"] == largest):
            curves.plot([t / 60 for t, _, _ in r["curve"]], [a for _, _, a in r["curve"]], color=color, marker=".",
                        alpha=0.7, label=variant if number == 0 else None)
    frontier.set_xscale("log")
    frontier.set_title("top-1 against training time (lines: seed means through the budgets)")
    curves.set_title(f"per-epoch evaluations at the {largest:g}-dense-epoch budget")
    save_time_plot(figure, (frontier, curves), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                        help="training time budgets, in dense epochs")
    parser.add_argument("--train-shards", type=int, default=2, help="Fashion-MNIST training shards (5,000 each)")
    parser.add_argument("--test-shards", type=int, default=1, help="Fashion-MNIST test shards (5,000 each)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "budget")
    parser.add_argument("--finished-only", action="store_true", help="train nothing: summarise the finished runs")
    args = parser.parse_args()
    out = args.out.resolve()
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    data = training_subset(args.train_shards, args.test_shards)
    rows, per_epoch = [], {}
    for seed in args.seeds:
        rows += run_seed(seed, args.budgets, runs, data, per_epoch, train=not args.finished_only)
    summary, checks = summarise(rows), target(rows, args.budgets)
    table = markdown(summary, checks, args.seeds)
    print(table)
    (out / "budget.md").write_text(table + "\n")
    (out / "budget.json").write_text(json.dumps({"runs": rows, "summary": summary, "target": checks}, indent=1) + "\n")
    plot(rows, out / "budget.png")


if __name__ == "__main__":
    sys.exit(main())
