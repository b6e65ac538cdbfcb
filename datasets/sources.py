"""Built-in data sources that trivit can turn into shards by name."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    """The training and validation shards of a run, with what their index says about them."""

    train_urls: list[str]
    val_urls: list[str]
    train_samples: int
    classes: list[str]


def resolve_shards(data: DataConfig) -> ShardSet:
    """Locate the run's shards: ``data.train_urls``/``val_urls``, or the prepared built-in ``data.source``.

    Checked up front, each with the fix in the message: shards that do not exist, shards the
    index does not list (the epoch length would be wrong), shards the index lists that are gone.
    """
    train, val, index_path = data.train_urls, data.val_urls, data.index
    if not train:
        folder = prepare_source(data.source, data.cache_dir)
        index = read_index(folder / INDEX_NAME)
        splits = index["splits"]
        train = str(folder / splits["train"]["urls"])
        val = val or str(folder / splits["test" if "test" in splits else "val"]["urls"])
        index_path = index_path or str(folder / INDEX_NAME)
    train_urls = expand_urls(train)
    val_urls = expand_urls(val) if val else []
    check_shards_exist(train_urls, "data.train_urls", train)
    check_shards_exist(val_urls, "data.val_urls", val)
    index = read_index(index_path or Path(train_urls[0]).parent / INDEX_NAME)
    counts = {name: count for split in index["splits"].values() for name, count in zip(split["shards"], split["counts"])}
    unlisted = [url for url in train_urls if shard_name(url) not in counts]
    if unlisted:
        raise ValueError(f"{len(unlisted)} training shards are not in the index (first: {unlisted[0]}); "
                         "rewrite the index with 'trivit shards' or point data.index at the right one")
    check_index_complete(index, train_urls)
    return ShardSet(train_urls=train_urls, val_urls=val_urls,
                    train_samples=sum(counts[shard_name(url)] for url in train_urls), classes=list(index["classes"]))


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
