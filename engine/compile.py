"""torch.compile on each backend, and the count of graphs a compiled run has compiled.

The whole model is compiled in place (``nn.Module.compile``), so every wrapper around it (DDP,
a DeepSpeed engine) and the evaluation call the compiled forward; FSDP2 compiles each block
before sharding, as torchtitan does, so that the per-block all-gathers stay outside the graphs.

A compiled model specialises on the keep rates (they fix the kept-token counts, hence the
shapes; ``dynamic=False`` keeps dynamo from tracing them as symbols, which would give slower
kernels and cannot pass through activation checkpointing): one graph per distinct rate in training,
and for evaluation at the targets one per batch size it forwards (the full batch, each loader
worker's last one, the placeholder image of a rank that ran out) and per evaluated model (the EMA
too). With the ramp quantised to ``levels`` rates below 1.0 the whole run compiles at most
``graph_bound(levels, ...)`` graphs of the model's forward; dynamo's recompile limit is raised to
that bound, and a function that still reaches it (and would run eager from then on) is reported.
"""
from __future__ import annotations

import logging

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from trivit.config import ConfigError

log = logging.getLogger(__name__)


def graph_bound(levels: int, eval_shapes: int = 2, eval_models: int = 1) -> int:
    """Graphs of the whole-model forward over a run: train at 1.0 and each level, evaluate each of the
    ``eval_models`` at the targets at each of ``eval_shapes`` batch sizes."""
    return levels + 1 + eval_models * eval_shapes


def allow_recompiles(levels: int, locations: int, eval_shapes: int, eval_models: int) -> None:
    """Raise dynamo's per-function recompile limit to the run's bound, so no rate nor evaluation batch
    falls back to eager, and report any function that reaches it all the same.

    Under FSDP2 the blocks share one compiled ``forward`` and one ``forward_routed``, specialised
    on each sequence length (one before and one after each of the ``locations``), hence the product.
    """
    raise_recompile_limit(graph_bound(levels, eval_shapes, eval_models) * (locations + 1))
    report_recompile_limit()


def raise_recompile_limit(needed: int) -> None:
    """Let dynamo compile a function ``needed`` times before it falls back to eager (never lowers it)."""
    if torch._dynamo.config.recompile_limit < needed:
        torch._dynamo.config.recompile_limit = needed


class _RecompileLimitReport(logging.Filter):
    """Turns dynamo's note that a function hit its recompile limit into trivit's warning (once per function)."""

    def __init__(self) -> None:
        super().__init__()
        self.reported: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if "hit config." in str(record.msg) and len(record.args or ()) >= 3:
            limit, value, function = (str(arg) for arg in record.args[:3])
            if function not in self.reported:
                self.reported.add(function)
                log.warning("torch.compile: %s reached dynamo's %s (%s graphs) and runs EAGER from now on: its "
                            "inputs took more shapes than trivit counted (keep rates, evaluation batch sizes). Set "
                            "sparsity.schedule.levels lower, or see which shapes with TORCH_LOGS=recompiles",
                            function, limit, value)
        return True


_REPORT = _RecompileLimitReport()


def report_recompile_limit() -> None:
    """Log a warning when dynamo stops compiling a function at its recompile limit (idempotent)."""
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    if _REPORT not in dynamo_log.filters:
        dynamo_log.addFilter(_REPORT)


def check_backend(name: str) -> None:
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError("engine.compile_backend", f"got {name!r}; torch.compile knows "
                                                    f"{', '.join(torch._dynamo.list_backends())} (and 'aot_eager')")


def compile_model(model: nn.Module, backend: str) -> None:
    """Compile ``model``'s forward in place (single, DDP, evaluation)."""
    model.compile(backend=backend, dynamic=False)


def compile_blocks(model: nn.Module, backend: str) -> None:
    """Compile each block's forward, and its entries ``forward_routed`` (pruning), ``forward_cross`` (semantic
    tokens) and ``forward_paired`` (DCAL), in place (FSDP2)."""
    for block in model.blocks:
        block.compile(backend=backend, dynamic=False)
        for entry in ("forward_routed", "forward_cross", "forward_paired"):
            setattr(block, entry, torch.compile(getattr(block, entry), backend=backend, dynamic=False))


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (every recompilation adds one)."""
    return counters["stats"]["unique_graphs"]


class CompileWatch:
    """What a compiled run adds to the loop: dynamo's recompile limit raised to the run's bound before the first
    forward (:func:`allow_recompiles`), and the graph count in each metrics line; nothing with ``engine.compile`` off."""

    def __init__(self, enabled: bool, levels: int, locations: int, eval_shapes: int, eval_models: int):
        self.enabled = enabled
        if enabled:
            allow_recompiles(levels, locations, eval_shapes, eval_models)

    def metrics(self) -> dict[str, int]:
        return {"compiled_graphs": compiled_graphs()} if self.enabled else {}
