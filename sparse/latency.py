"""Block latency tables for latency-aware pruning (NViT): measured once on the machine, then interpolated.

A block's latency is taken as the sum of its attention part (norm, qkv, attention, projection),
a function of the embedding width, heads, query/key width and value width, and its MLP part
(norm and the two linear layers), a function of the embedding and MLP widths: two tables, over
4 and 2 widths, rather than one over all 5 (625 x 5 points on a 5-point grid). Each entry is the
median of repeated forward passes of that part at the model's sequence length and a stated
batch size; ``trivit bench latency-table`` measures them. Timing noise can make a wider entry
measure faster than a narrower one; the table keeps the running maximum along every width (a
wider part is never faster) and records the largest such correction. Between grid points the
latency is interpolated multilinearly.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trivit.config import ConfigError, from_dict
from trivit.sparse.blocks import TriLevelBlock
from trivit.sparse.pruned import BlockWidths, PrunedArch, set_block_widths
from trivit.sparse.vit import create_vit

ATTENTION_WIDTHS = ("embed", "heads", "qk", "v")
MLP_WIDTHS = ("embed", "mlp")
GRID_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
"""Grid points of each width, as fractions of the unpruned model's (plus the narrowest width pruning leaves)."""


log = logging.getLogger(__name__)

@dataclass(kw_only=True)
class LatencyTable:
    """Block latency (ms) of ``model`` over a grid of widths, measured on ``device``."""

    model: str
    device: str
    batch_size: int
    tokens: int
    grid: dict[str, list[int]]
    attention_ms: list[Any]
    """Over ``ATTENTION_WIDTHS``' grids, nested in that order."""
    mlp_ms: list[Any]
    """Over ``MLP_WIDTHS``' grids."""
    monotone_correction: float = 0.0
    """The largest fraction by which a measured entry was raised to keep the table monotone (timing noise)."""
    correction_of_full: float = 0.0
    """The largest raise as a share of the full-width part's time: how far noise can move a latency fraction."""

    def __post_init__(self) -> None:
        for name in ATTENTION_WIDTHS + MLP_WIDTHS:
            points = self.grid.get(name)
            if not points or sorted(set(points)) != list(points):
                raise ConfigError(f"grid.{name}", f"got {points}; a latency grid is increasing widths")
        expected = {"attention_ms": [len(self.grid[n]) for n in ATTENTION_WIDTHS],
                    "mlp_ms": [len(self.grid[n]) for n in MLP_WIDTHS]}
        for name, shape in expected.items():
            if list(np.shape(getattr(self, name))) != shape:
                raise ConfigError(name, f"has shape {list(np.shape(getattr(self, name)))}, not the grid's {shape}")

    def block_ms(self, embed: int, heads: int, qk: int, v: int, mlp: int) -> float:
        """Interpolated latency of one block of these widths."""
        attention = interpolate([self.grid[n] for n in ATTENTION_WIDTHS], np.asarray(self.attention_ms),
                                (embed, heads, qk, v))
        return attention + interpolate([self.grid[n] for n in MLP_WIDTHS], np.asarray(self.mlp_ms), (embed, mlp))

    def model_ms(self, arch: PrunedArch) -> float:
        """Latency of the blocks of ``arch`` (the patch embedding and head are left out: pruning hardly changes them)."""
        return sum(self.block_ms(arch.embed_dim, b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in arch.blocks)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self)) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no latency table {path}; measure one with `trivit bench latency-table`")
        try:
            return from_dict(cls, json.loads(path.read_text()))
        except (json.JSONDecodeError, ConfigError) as error:
            raise ValueError(f"{path} is not a latency table ({error})") from None

    def check_fits(self, arch: PrunedArch) -> None:
        """Refuse a table measured for other widths than ``arch``'s: its grid must reach the model's widths."""
        widest = {"embed": arch.embed_dim, "heads": max(b.heads for b in arch.blocks),
                  "qk": max(b.qk_dim for b in arch.blocks), "v": max(b.v_dim for b in arch.blocks),
                  "mlp": max(b.mlp_dim for b in arch.blocks)}
        beyond = {name: width for name, width in widest.items() if width > self.grid[name][-1]}
        if beyond:
            raise ValueError(f"the latency table of {self.model} reaches widths {({n: self.grid[n][-1] for n in beyond})}"
                             f" but the model has {beyond}; measure one for this model with `trivit bench latency-table`")


def interpolate(axes: Sequence[Sequence[int]], values: np.ndarray, point: Sequence[float]) -> float:
    """Multilinear interpolation of ``values`` (over the grid ``axes``) at ``point``, clamped to the grid."""
    lows, weights = [], []
    for axis, x in zip(axes, point):
        axis = np.asarray(axis, dtype=np.float64)
        x = float(np.clip(x, axis[0], axis[-1]))
        low = int(np.clip(np.searchsorted(axis, x, side="right") - 1, 0, max(len(axis) - 2, 0)))
        span = axis[low + 1] - axis[low] if len(axis) > 1 else 1.0
        lows.append(low)
        weights.append((x - axis[low]) / span if len(axis) > 1 else 0.0)
    total = 0.0
    for corner in itertools.product((0, 1), repeat=len(axes)):
        weight = 1.0
        index = []
        for low, w, up, axis in zip(lows, weights, corner, axes):
            weight *= w if up else 1 - w
            index.append(min(low + up, len(axis) - 1))
        if weight:
            total += weight * float(values[tuple(index)])
    return float(total)


def monotone(values: np.ndarray) -> tuple[np.ndarray, float]:
    """``values`` raised to their running maximum along every axis, and the largest relative raise."""
    result = values.astype(np.float64)
    for axis in range(result.ndim):
        result = np.maximum.accumulate(result, axis=axis)
    return result, float(np.max((result - values) / values))


def grid_points(width: int, narrowest: int) -> list[int]:
    """The grid of one width: ``GRID_FRACTIONS`` of it, and the narrowest width pruning leaves."""
    return sorted({narrowest, *(max(narrowest, round(width * f)) for f in GRID_FRACTIONS)})


def interleaved_medians(runs: Sequence[Callable[[], Any]], repeats: int, device: torch.device) -> list[float]:
    """Median wall time (ms) of each of ``runs`` over ``repeats`` rounds that time every run once, after an
    untimed round: a slow spell of the machine falls on every entry alike rather than on a few."""
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: list[list[float]] = [[] for _ in runs]
    for round_index in range(repeats + 1):
        for run, timed in zip(runs, times):
            synchronize()
            start = time.perf_counter()
            run()
            synchronize()
            if round_index:
                timed.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(timed) for timed in times]


MAX_CORRECTION = 0.5
"""The largest monotone correction a measured table may need, as a share of the full-width part's time (50%):
beyond it the timings are noise (a part measured faster than a narrower one by half the full part's time)."""


def measure_checked_table(name: str, timm_kwargs: dict[str, Any], narrowest: dict[str, int], device: torch.device,
                          batch_size: int, repeats: int, max_correction: float = MAX_CORRECTION) -> LatencyTable:
    """:func:`measure_latency_table`, measured again (3x the repeats) when its timings needed a larger monotone
    correction than ``max_correction`` of the full-width part's time, and refused if they still do: a noisy
    table would steer pruning at random."""
    table = measure_latency_table(name, timm_kwargs, narrowest, device, batch_size, repeats)
    if table.correction_of_full > max_correction:
        log.warning("the latency table's timings were noisy (a correction of %.0f%% of the full block's time, bound "
                    "%.0f%%): measuring again with %d repeats", 100 * table.correction_of_full, 100 * max_correction,
                    3 * repeats)
        table = measure_latency_table(name, timm_kwargs, narrowest, device, batch_size, 3 * repeats)
    if table.correction_of_full > max_correction:
        raise ValueError(f"the latency table's timings are too noisy to steer pruning: a block part measured faster "
                         f"than a narrower one by {table.correction_of_full:.0%} of the full part's time (bound "
                         f"{max_correction:.0%}; {table.monotone_correction:.0%} of the narrower part's own). Measure "
                         f"on a quiet machine, at the batch you train with (--batch, now {batch_size}; at tiny batches "
                         "and token counts a block's time is launch overhead, not width), with more --repeats")
    return table


def measure_latency_table(name: str, timm_kwargs: dict[str, Any], narrowest: dict[str, int], device: torch.device,
                          batch_size: int, repeats: int, dtype: torch.dtype = torch.float32) -> LatencyTable:
    """Time one block's attention and MLP parts of timm model ``name`` over the grid of widths.

    ``narrowest``: per width, the smallest one pruning can leave (its group size), the grid's first point.
    """
    with torch.device("meta"):
        base = create_vit(name, **timm_kwargs)
    widths = PrunedArch.of_vit(name, base).blocks[0]
    tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    full = {"embed": base.embed_dim, "heads": widths.heads, "qk": widths.qk_dim, "v": widths.v_dim,
            "mlp": widths.mlp_dim}
    grid = {n: grid_points(full[n], narrowest[n]) for n in full}
    qkv_bias = base.blocks[0].attn.qkv.bias is not None
    inputs = {e: torch.randn(batch_size, tokens, e, device=device, dtype=dtype) for e in grid["embed"]}

    def block(embed: int, heads: int, qk: int, v: int, mlp: int) -> TriLevelBlock:
        with torch.device(device):  # initialised where it runs
            module = TriLevelBlock(dim=embed, num_heads=1, qkv_bias=qkv_bias)
            set_block_widths(module, BlockWidths(heads=heads, qk_dim=qk, v_dim=v, mlp_dim=mlp, scale=widths.scale))
        return module.to(dtype=dtype).eval()

    def attention_part(e: int, h: int, q: int, v: int) -> Callable[[], Any]:
        module = block(e, h, q, v, grid["mlp"][0])
        return lambda: module.attend(module.norm1(inputs[e]), None, "none")

    def mlp_part(e: int, m: int) -> Callable[[], Any]:
        module = block(e, 1, grid["qk"][0], grid["v"][0], m)
        return lambda: module.mlp(module.norm2(inputs[e]))

    shapes = {"attention": [len(grid[n]) for n in ATTENTION_WIDTHS], "mlp": [len(grid[n]) for n in MLP_WIDTHS]}
    runs = [attention_part(*(grid[n][i] for n, i in zip(ATTENTION_WIDTHS, index)))
            for index in np.ndindex(*shapes["attention"])]
    runs += [mlp_part(*(grid[n][i] for n, i in zip(MLP_WIDTHS, index))) for index in np.ndindex(*shapes["mlp"])]
    with torch.no_grad():
        medians = np.asarray(interleaved_medians(runs, repeats, device))
    split = int(np.prod(shapes["attention"]))
    parts = [medians[:split].reshape(shapes["attention"]), medians[split:].reshape(shapes["mlp"])]
    (attention, attention_raise), (mlp, mlp_raise) = (monotone(part) for part in parts)
    of_full = max(float(np.max(fixed - part) / part.max()) for fixed, part in zip((attention, mlp), parts))
    return LatencyTable(model=name, device=str(device), batch_size=batch_size, tokens=tokens, grid=grid,
                        attention_ms=attention.tolist(), mlp_ms=mlp.tolist(),
                        monotone_correction=max(attention_raise, mlp_raise), correction_of_full=of_full)
