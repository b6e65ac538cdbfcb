"""The training step leaves the host free: at most one host sync per step at non-logging steps.

On a GPU every read of a device value on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``,
``.numpy()``) makes the CPU wait for the GPU, so the next step's kernels are launched only once the
current one has finished. The CPU cannot show the wait, so the test counts the reads themselves:
``aten._local_scalar_dense`` through a dispatch mode, and the other reads by wrapping them, each
attributed to the trivit line that made it. A copy to a device (``.to(device)``) without
``non_blocking`` counts too: from pageable memory CUDA makes it wait for the queued work.
The optimizer's own CPU step counters are left out.
Steps N+1..2N are compared with steps 1..N, so start-up and the final checkpoint cancel out.
"""
from __future__ import annotations

import collections
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import tiny_overrides
from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
SOURCES = tuple(str(ROOT / folder) for folder in ("engine", "sparse", "datasets", "trivit"))
READS = ("tolist", "cpu", "numpy", "item", "__bool__", "__float__", "__int__", "to")
SCALAR_READS = ("item", "__bool__", "__float__", "__int__")
"""Reads that reach ``aten._local_scalar_dense``, counted there."""


def blocking_copy(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` copies to a device and waits for it."""
    to_device = "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args)
    return to_device and not kwargs.get("non_blocking", False)


def trivit_site(direct: bool = False) -> str | None:
    """The innermost trivit line on the stack (None when the read is not trivit's); with ``direct``, only
    if that line made the call itself (a wrapped method's caller)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if frame.filename.startswith(SOURCES):
            return f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno}"
        if direct:
            return None
    return None


class SyncCensus(TorchDispatchMode):
    """Counts host reads of tensor values by trivit line, outside the optimizer's step."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()
        self.in_optimizer = 0

    def count(self, direct: bool = False) -> None:
        site = trivit_site(direct)
        if site is not None and not self.in_optimizer:
            self.sites[site] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count()
        return func(*args, **(kwargs or {}))


@contextmanager
def census():
    counter = SyncCensus()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrapped(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            if name not in SCALAR_READS and (name != "to" or blocking_copy(args, kwargs)):
                counter.count(direct=True)
            return original(self, *args, **kwargs)
        return read

    def enter(*_):
        counter.in_optimizer += 1

    def leave(*_):
        counter.in_optimizer -= 1

    handles = [register_optimizer_step_pre_hook(enter), register_optimizer_step_post_hook(leave)]
    for name in READS:
        setattr(torch.Tensor, name, wrapped(name))
    try:
        with counter:
            yield counter.sites
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for handle in handles:
            handle.remove()


LEVELS = {"sparsity.tokens.keep_rate": "0.5", "sparsity.tokens.locations": "[0]",
          "sparsity.attention.keep_rate": "0.5", "sparsity.schedule.start_epochs": "0",
          "sparsity.schedule.span_epochs": "0", "sparsity.examples.policy": "forgetting",
          "sparsity.examples.initial_remove_fraction": "0.0",
          "logging.every_steps": "1000", "checkpoint.every_steps": "1000", "schedule.eval_every_steps": "1000",
          "data.val_urls": "", "data.num_workers": "1"}


def syncs_over(steps: int, shards: Path, run_dir: Path, **extra: str) -> collections.Counter[str]:
    trainer = Trainer(load(TrainConfig, None, tiny_overrides(shards, run_dir, **{**LEVELS, **extra,
                                                                                 "schedule.max_steps": str(steps)})))
    with census() as sites:
        trainer.train()
    return sites


@pytest.mark.parametrize("extra", [{}, {"engine.grad_accum_steps": "2"}], ids=["one micro-batch", "accumulation 2"])
def test_at_most_one_host_sync_per_step(tiny_shards, tmp_path, extra):
    """All three levels, mixup and the EMA: steps 7..12 add at most one read each to steps 1..6."""
    short = syncs_over(6, tiny_shards, tmp_path / "short", **extra)
    long = syncs_over(12, tiny_shards, tmp_path / "long", **extra)
    added = long - short
    print("syncs per site over steps 7..12:", dict(added), file=sys.stderr)
    assert sum(added.values()) <= 6, f"more than one host sync per step, by trivit line: {dict(added)}"
