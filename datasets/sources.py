"""Built-in data sources that trivit can turn into shards by name."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trivit.config import ConfigError
from trivit.datasets import fashion_mnist
from trivit.datasets.config import DataConfig
from trivit.datasets.shards import INDEX_NAME, read_index
from trivit.datasets.stream import expand_urls
from trivit.locks import exclusive

SOURCES: dict[str, Callable[[str | Path], Path]] = {"fashion-mnist": fashion_mnist.prepare}


def prepare_source(name: str, cache_dir: str | Path) -> Path:
    """Shards of built-in source ``name`` in ``cache_dir`` (written on first use); returns their folder.

    Every rank of a launch calls this before the process group exists: a lock file in
    ``cache_dir`` lets the first process write the shards while the others wait, then find them.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; built-in sources: {', '.join(SOURCES)} "
                         "(or set data.train_urls to your own shards)")
    cache = Path(cache_dir).expanduser()
    with exclusive(cache / f".{name}.lock", f"waiting for another process to prepare {name} in {cache}"):
        return SOURCES[name](cache)


@dataclass(frozen=True)
class ShardSet:
    """The training and validation shards of a run, with what their indexes say about them."""

    train_urls: list[str]
    val_urls: list[str]
    train_samples: int
    """Samples in the listed training shards (the index's counts): the epoch length comes from it."""
    classes: list[str]
    num_ids: int = 0
    """Size of the global sample-id space: the sum over sources of their training split's size."""
    id_offsets: dict[str, int] = field(default_factory=dict)
    """Per training URL, what is added to its samples' ids so that joined sources never share an id."""
    shard_counts: dict[str, int] = field(default_factory=dict)
    """Per training URL, the samples its index says it holds."""

    def fingerprint(self) -> str:
        """A digest of what the indexes say of the training data (shard names, sample and id counts, classes):
        a checkpoint records it, so data swapped under a run is noticed at resume."""
        names = [url.rsplit("/", 1)[-1] for url in self.train_urls]
        text = json.dumps([names, self.train_samples, self.num_ids, self.classes, sorted(self.id_offsets.values())])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Source:
    """One training source (a '::'-separated part of ``data.train_urls``) read with its own index."""

    urls: list[str]
    samples: int
    """Samples in the listed shards."""
    num_ids: int
    """Ids its splits number: each split numbers its samples 0 .. total - 1, whether or not every
    shard is listed, and the splits it lists shards of are placed one after the other."""
    id_offsets: dict[str, int]
    """Per URL, the offset of its split within the source."""
    classes: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    """Per URL, the samples the index says it holds."""


def resolve_shards(data: DataConfig) -> ShardSet:
    """Locate the run's shards: ``data.train_urls``/``val_urls``, or the prepared built-in ``data.source``.

    A source is brace-expanded shard paths, or the folder ``trivit shards`` wrote: its index then
    lists the shards (the 'train' split for training, 'val' or else 'test' for validation), so
    shard counts never have to be typed. Several sources joined with '::' each have their own
    index (beside their first shard, or the matching '::'-part of ``data.index``) and their sample
    ids are shifted into one global space. Checked up front, each with the fix in the message:
    shards that do not exist, shards an index does not list (the epoch length would be wrong),
    shards an index lists that are gone, sources whose class lists differ.
    """
    train, val, index_spec = data.train_urls, data.val_urls, data.index
    if not train:
        folder = prepare_source(data.source, data.cache_dir)
        train, val = str(folder), val or str(folder)
    patterns = [expand_home(part) for part in train.split("::")]
    index_paths = [expand_home(part) for part in index_spec.split("::")] if index_spec else [""] * len(patterns)
    if len(index_paths) != len(patterns):
        raise ConfigError("data.index", f"got {len(index_paths)} index paths for {len(patterns)} training sources; "
                                        "give one per source, joined with '::' in the same order, or none (each "
                                        "source's index.json beside its shards)")
    sources = [resolve_source(pattern, index_path) for pattern, index_path in zip(patterns, index_paths)]
    for pattern, source in zip(patterns[1:], sources[1:]):
        if source.classes != sources[0].classes:
            raise ValueError(f"training source {pattern!r} has other classes than {patterns[0]!r} ({source.classes[:5]} "
                             f"vs {sources[0].classes[:5]}): joined sources must share one class list")
    val_urls = resolve_val_urls(val)
    offsets, base = {}, 0
    for source in sources:
        offsets.update({url: base + offset for url, offset in source.id_offsets.items()})
        base += source.num_ids
    return ShardSet(train_urls=[url for source in sources for url in source.urls], val_urls=val_urls,
                    train_samples=sum(source.samples for source in sources), classes=sources[0].classes,
                    num_ids=base, id_offsets={url: o for url, o in offsets.items() if o},
                    shard_counts={url: n for source in sources for url, n in source.counts.items()})


def resolve_val_urls(val: str, key: str = "data.val_urls") -> list[str]:
    """Validation shards: brace-expanded paths or folders (their index's 'val', else 'test' split), '::'-joined."""
    urls = [url for part in val.split("::") for url in source_urls(expand_home(part), VAL_SPLITS)] if val else []
    check_shards_exist(urls, key, val)
    return urls


def resolve_source(pattern: str, index_path: str) -> Source:
    """One training source: its shards checked against its own index, its ids laid out split by split."""
    urls = source_urls(pattern, TRAIN_SPLITS, index_path)
    check_shards_exist(urls, "data.train_urls", pattern)
    index = read_index(index_path or Path(urls[0]).parent / INDEX_NAME)
    names = {shard_name(url) for url in urls}
    counts, split_offsets, num_ids = {}, {}, 0
    for entry in index["splits"].values():
        if names & set(entry["shards"]):
            counts.update(zip(entry["shards"], entry["counts"]))
            split_offsets.update(dict.fromkeys(entry["shards"], num_ids))
            num_ids += entry.get("total", sum(entry["counts"]))
    unlisted = [url for url in urls if shard_name(url) not in counts]
    if unlisted:
        raise ValueError(f"{len(unlisted)} training shards are not in the index (first: {unlisted[0]}); "
                         "rewrite the index with 'trivit shards' or point data.index at the right one")
    check_index_complete(index, urls)
    return Source(urls=urls, samples=sum(counts[shard_name(url)] for url in urls), num_ids=num_ids,
                  id_offsets={url: split_offsets[shard_name(url)] for url in urls}, classes=list(index["classes"]),
                  counts={url: counts[shard_name(url)] for url in urls})


TRAIN_SPLITS = ("train",)
VAL_SPLITS = ("val", "test")


def source_urls(pattern: str, splits: tuple[str, ...], index_path: str = "") -> list[str]:
    """The shards of one source: a folder's index split (the first of ``splits`` it has), else the
    brace-expanded pattern."""
    folder = Path(pattern)
    if not folder.is_dir():
        return expand_urls(pattern)
    if not index_path and not (folder / INDEX_NAME).is_file() and any(p.is_dir() for p in folder.iterdir()):
        raise FileNotFoundError(f"{folder} holds folders but no {INDEX_NAME}: an image folder, not shards? trivit reads "
                                f"WebDataset shards: run 'trivit shards {folder} DEST' first, then point at DEST")
    index = read_index(index_path or folder / INDEX_NAME)
    split = next((name for name in splits if name in index["splits"]), None)
    if split is None:
        raise ValueError(f"the index of {folder} has no {' or '.join(repr(s) for s in splits)} split (it has "
                         f"{', '.join(index['splits'])}); name the shards themselves, e.g. {folder}/train-{{...}}.tar")
    return [str(folder / name) for name in index["splits"][split]["shards"]]


def expand_home(path: str) -> str:
    """``~`` expanded in a local path (a ``pipe:`` command's shell expands its own)."""
    return path if path.startswith("pipe:") else os.path.expanduser(path)


def shard_name(url: str) -> str:
    """The shard's file name in a path, URL or ``pipe:`` command (``pipe:aws s3 cp s3://b/train-000001.tar -``)."""
    match = re.search(r"([^/\s]+\.tar)(?=\s|$)", url)
    return match.group(1) if match else Path(url).name


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def check_shards_exist(urls: list[str], key: str, pattern: str) -> None:
    local = [url for url in urls if is_local(url)]
    missing = [url for url in local if not Path(url).is_file()]
    if local and len(missing) == len(local):
        raise FileNotFoundError(f"no shard matches {key}={pattern!r}; check the path and the brace range "
                                "(e.g. /data/imagenet/train-{000000..001023}.tar)")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(urls)} shards of {key} do not exist (first: {missing[0]}); "
                                "restore them or narrow the brace range")


def check_index_complete(index: dict, train_urls: list[str]) -> None:
    """Every shard that the index lists for the training split(s) must still be there (local shards)."""
    local = [Path(url) for url in train_urls if is_local(url)]
    if not local:
        return
    folder, names = local[0].parent, {p.name for p in local}
    for split, entry in index["splits"].items():
        if names & set(entry["shards"]):
            gone = [name for name in entry["shards"] if not (folder / name).is_file()]
            if gone:
                raise FileNotFoundError(f"the index lists {len(gone)} {split} shards that are missing from {folder} "
                                        f"(first: {gone[0]}); restore them or rewrite the shards with 'trivit shards'")
