"""CUDA's unlearnable shards on the demo: the demo recipe trained on clean, unlearnable and shared-filter
Fashion-MNIST training shards, evaluated on the clean test set; the unlearnable-trained model also on the
test set filtered with the same key, and with the class filters permuted (the paper's diagnostic).

Per variant and seed, through the CLI: ``trivit shards fashion-mnist`` (with ``--unlearnable KEY`` or
``--unlearnable-shared KEY``), ``trivit train --config configs/demo.yaml`` on those shards with the clean
test split for evaluation, and ``trivit eval`` on the filtered test sets. Outputs: a Markdown table on
stdout and ``<out>/unlearnable_study.{md,json}``.

    python benchmarks/unlearnable_study.py --seeds 0 1 --epochs 2 --out benchmarks/results/unlearnable
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from trivit.datasets.fashion_mnist import CLASSES, PACKAGE_DIR, load_split, samples, unlearnable_images
from trivit.datasets.shards import write_index, write_split
from trivit.datasets.unlearnable import UnlearnableSpec
from trivit.engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
KEY = "trivit unlearnable study"


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trivit", *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"trivit {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def urls(folder: Path, split: str) -> str:
    return str(folder / json.loads((folder / "index.json").read_text())["splits"][split]["urls"])


def filtered_test_set(dest: Path, permuted: bool) -> Path:
    """The test split filtered with the study's key: each image by its own class's filter, or by the next class's."""
    if not (dest / "index.json").is_file():
        images, labels = load_split(PACKAGE_DIR, "test")
        picks = (labels + 1) % len(CLASSES) if permuted else labels
        filtered, _ = unlearnable_images(images, picks, UnlearnableSpec(KEY))
        write_index(dest, {"test": write_split(samples(filtered, labels), dest, "test", 5000)}, CLASSES)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "unlearnable")
    args = parser.parse_args()
    out = args.out.resolve()
    data = out / "data"
    shards = {"clean": data / "clean", "unlearnable": data / "unlearnable", "shared": data / "shared"}
    flags = {"clean": [], "unlearnable": ["--unlearnable", KEY], "shared": ["--unlearnable-shared", KEY]}
    for name, folder in shards.items():
        if not (folder / "index.json").is_file():
            cli("shards", "fashion-mnist", str(folder), "--quiet", *flags[name])
    tests = {"same filters": filtered_test_set(data / "test_filtered", permuted=False),
             "permuted filters": filtered_test_set(data / "test_permuted", permuted=True)}
    rows = []
    for seed in args.seeds:
        for name, folder in shards.items():
            run = out / "runs" / f"{name}_seed{seed}"
            if not (run / "model.safetensors").is_file():
                cli("train", "--config", str(ROOT / "configs" / "demo.yaml"), f"run_dir={run}", f"seed={seed}",
                    f"data.train_urls={urls(folder, 'train')}", f"data.val_urls={urls(shards['clean'], 'test')}",
                    f"schedule.epochs={args.epochs}", "logging.progress_bar=false")
            row = {"variant": name, "seed": seed,
                   "clean_top1": [r for r in read_metrics(run) if "eval_top1" in r][-1]["eval_top1"]}
            if name == "unlearnable":
                for test, test_folder in tests.items():
                    table = run / f"eval_{test.replace(' ', '_')}.json"
                    cli("eval", str(run), "--keep-rates", "1.0", "--repeats", "1", "--data", str(test_folder),
                        "--out", str(table))
                    row[test] = json.loads(table.read_text())[0]["top1"]
            rows.append(row)
    summary = summarise(rows, args.epochs)
    (out / "unlearnable_study.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "unlearnable_study.md").write_text(summary + "\n")
    print(summary)


def summarise(rows: list[dict], epochs: int) -> str:
    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    lines = [f"The demo recipe, {epochs} epochs, seeds {sorted({r['seed'] for r in rows})}; test top-1 (mean, min-max).",
             "", "| training shards | clean test | test filtered, same key | test filtered, filters permuted |",
             "|---|---|---|---|"]
    for name in ("clean", "unlearnable", "shared"):
        mine = [r for r in rows if r["variant"] == name]
        extra = [spread([r[t] for r in mine]) if t in mine[0] else "-" for t in ("same filters", "permuted filters")]
        lines.append(f"| {name} | {spread([r['clean_top1'] for r in mine])} | {extra[0]} | {extra[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
