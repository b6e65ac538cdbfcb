"""Writing WebDataset shards and the JSON index that sits beside them.

Each sample is stored as ``<key>.<ext>`` (the encoded image bytes, e.g. ``png`` or ``jpg``),
``<key>.cls`` (class index) and ``<key>.id`` (global integer sample id). The index records,
per split, the shard file names and their sample counts, and the class names.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds

INDEX_NAME = "index.json"


def write_split(samples: Iterable[dict[str, Any]], dest: Path, split: str, samples_per_shard: int) -> dict[str, Any]:
    """Write ``samples`` (dicts with ``__key__``, image bytes, ``cls``, ``id``) to ``dest/<split>-NNNNNN.tar``.

    Returns the split's index entry. Each shard is written by :func:`write_shard`: atomically,
    with a fixed mtime in the tar headers, so the same samples give byte-identical shards.
    """
    dest.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    counts: list[int] = []
    samples = iter(samples)
    while chunk := list(itertools.islice(samples, samples_per_shard)):
        names.append(f"{split}-{len(names):06d}.tar")
        counts.append(write_shard(dest / names[-1], chunk))
    return split_entry(names, counts)


def split_entry(names: list[str], counts: list[int]) -> dict[str, Any]:
    """A split's index entry: its shard names, their sample counts, the total and a brace pattern."""
    return {"shards": names, "counts": counts, "total": sum(counts), "urls": brace_pattern(names)}


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write one shard atomically (temp file, then rename); returns its sample count."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with wds.TarWriter(str(tmp), mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    os.replace(tmp, path)
    return count


def brace_pattern(names: list[str]) -> str:
    """``['train-000000.tar', ..., 'train-000011.tar']`` -> ``'train-{000000..000011}.tar'``."""
    if len(names) == 1:
        return names[0]
    first, last = names[0], names[-1]
    prefix, suffix = first[: first.rindex("-") + 1], first[first.index("."):]
    return f"{prefix}{{{first[len(prefix):-len(suffix)]}..{last[len(prefix):-len(suffix)]}}}{suffix}"


def write_index(dest: Path, splits: dict[str, dict[str, Any]], classes: list[str]) -> Path:
    """Write the index JSON beside the shards (atomically)."""
    path = dest / INDEX_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"classes": classes, "splits": splits}, indent=1))
    os.replace(tmp, path)
    return path


def read_index(path: str | Path) -> dict[str, Any]:
    """Read a shard index; the error names the file and how to create it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"shard index {str(path)!r} not found: shards written by trivit have an {INDEX_NAME} beside them "
            "(set data.index to its path)"
        )
    return json.loads(path.read_text())
