"""Writing WebDataset shards and the JSON index that sits beside them.

Each sample is stored as ``<key>.<ext>`` (the encoded image bytes, e.g. ``png`` or ``jpg``),
``<key>.cls`` (class index) and ``<key>.id`` (global integer sample id). The index records,
per split, the shard file names and their sample counts, and the class names.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import webdataset as wds

from trivit.locks import exclusive_or_fail

log = logging.getLogger(__name__)

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


@contextmanager
def replacing_folder(dest: Path) -> Iterator[Path]:
    """A new folder to write a whole shard set into, put in ``dest``'s place only once the block ends.

    Readers find shards through the index, so a shard set must change as a whole: shards are written
    into ``.<name>.new`` beside ``dest`` (same filesystem), then ``dest`` is renamed away and the new
    folder renamed into its place. A writer killed at any point leaves ``dest`` either as it was or
    complete; the next writer finishes or undoes an interrupted swap (the new folder is complete when
    it holds its index, written last). A lock beside ``dest`` keeps two writers out of one folder.
    """
    dest = dest.expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} is a file; trivit shards writes a folder of shards and index.json: "
                                 "give a folder path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    new, old = (dest.with_name(f".{dest.name}.{suffix}") for suffix in ("new", "old"))
    with exclusive_or_fail(dest.with_name(f".{dest.name}.lock"), f"shard folder {str(dest)!r}"):
        _finish_interrupted_swap(dest, new, old)
        _check_only_shards(dest)
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        try:
            yield new
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        if not (new / INDEX_NAME).is_file():
            raise RuntimeError(f"internal: {new} was not finished with its {INDEX_NAME}")
        replaced = dest.exists()
        if replaced:
            os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
        if replaced:
            log.info("replaced the shards that were in %s", dest)


def _finish_interrupted_swap(dest: Path, new: Path, old: Path) -> None:
    """A writer killed between its two renames left no ``dest``: put the complete folder in place."""
    if dest.exists() or not old.exists():
        shutil.rmtree(old, ignore_errors=True)
        return
    complete = new if (new / INDEX_NAME).is_file() else old
    os.replace(complete, dest)
    log.warning("an earlier trivit shards into %s was interrupted while swapping folders; %s", dest,
                "its complete new shards are now in place" if complete == new else "the previous shards are back")
    shutil.rmtree(old, ignore_errors=True)


def _check_only_shards(dest: Path) -> None:
    """``dest`` is replaced as a whole, so it may hold nothing but a shard set."""
    if not dest.is_dir():
        return
    foreign = sorted(p.name for p in dest.iterdir()
                     if not (p.is_file() and (p.suffix == ".tar" or p.name == INDEX_NAME or p.name.endswith(".tmp"))))
    if foreign:
        raise FileExistsError(f"{dest} holds files that are not trivit shards ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); trivit shards replaces its output folder as a "
                              "whole: write into a new or empty folder")
