"""Training metrics: one JSON object per logged step in metrics.jsonl, and TensorBoard scalars."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"

class MetricsLogger:
    """Appends records to ``<run_dir>/metrics.jsonl`` and mirrors numeric values to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        """``record`` must hold ``step``; other numbers become scalars named by their key, list items
        ``key/i`` and mapping items ``key/name``."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                items = enumerate(value) if isinstance(value, list) else value.items() if isinstance(value, dict) \
                    else [(None, value)]
                for index, item in items:
                    if key != "step" and isinstance(item, (int, float)) and math.isfinite(item):
                        self.writer.add_scalar(key if index is None else f"{key}/{index}", item, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl in the order written, each evaluation's line (``step`` and
    ``eval_*``) merged into its step's training record written just before it."""
    records: list[dict[str, Any]] = []
    for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if records and "loss" not in record and records[-1]["step"] == record["step"]:
            records[-1] = {**records[-1], **record}
        else:
            records.append(record)
    return records


class Throughput:
    """Images per second of the training steps since the last record (loader waits included), and the
    seconds the run has spent in training steps (``total_seconds``; evaluations and checkpoints left
    out), which the trainer keeps in its checkpoints so that a resumed run goes on counting."""

    def __init__(self) -> None:
        self.images, self.seconds, self.tick = 0, 0.0, time.perf_counter()
        self.total_seconds = 0.0

    def start(self) -> None:
        """A step begins (waiting for its batch counts)."""
        self.tick = time.perf_counter()

    def add(self, images: int) -> None:
        """A step of ``images`` (all ranks) has ended."""
        seconds = time.perf_counter() - self.tick
        self.images += images
        self.seconds += seconds
        self.total_seconds += seconds

    def take(self) -> float:
        """The rate since the last ``take``, and start a new window."""
        rate = self.images / max(self.seconds, 1e-9)
        self.images, self.seconds = 0, 0.0
        return rate
