"""torch.compile on each backend, and the count of graphs a compiled run has compiled.

The whole model is compiled in place (``nn.Module.compile``), so every wrapper around it (DDP,
a DeepSpeed engine) and the evaluation call the compiled forward; FSDP2 compiles each block
before sharding, as torchtitan does, so that the per-block all-gathers stay outside the graphs.

A compiled model specialises on the keep rates (they fix the kept-token counts, hence the
shapes; ``dynamic=False`` keeps dynamo from tracing them as symbols, which would give slower
kernels and cannot pass through activation checkpointing): one graph per distinct rate in training, one for evaluation at the targets, one for the
evaluation's odd batch sizes. With the ramp quantised to ``levels`` rates below 1.0 the whole
run compiles at most ``graph_bound(levels)`` graphs of the model's forward.
"""
from __future__ import annotations

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from trivit.config import ConfigError


def graph_bound(levels: int) -> int:
    """Graphs of the whole-model forward over a run: train at 1.0 and each level, evaluate at the
    targets at the full and at a dynamic batch size."""
    return levels + 1 + 2


def allow_recompiles(levels: int, locations: int) -> None:
    """Raise dynamo's per-function recompile limit to the run's bound, so no rate falls back to eager.

    Under FSDP2 the blocks share one compiled ``forward`` and one ``forward_routed``, specialised
    on each sequence length (one before and one after each of the ``locations``), hence the product.
    """
    raise_recompile_limit(graph_bound(levels) * (locations + 1))


def raise_recompile_limit(needed: int) -> None:
    """Let dynamo compile a function ``needed`` times before it falls back to eager (never lowers it)."""
    if torch._dynamo.config.recompile_limit < needed:
        torch._dynamo.config.recompile_limit = needed


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
