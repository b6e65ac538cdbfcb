"""Built-in data sources that trivit can turn into shards by name."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trivit.datasets import fashion_mnist
from trivit.datasets.config import DataConfig
from trivit.datasets.shards import INDEX_NAME, read_index
from trivit.datasets.stream import expand_urls

SOURCES: dict[str, Callable[[str | Path], Path]] = {"fashion-mnist": fashion_mnist.prepare}


def prepare_source(name: str, cache_dir: str | Path) -> Path:
    """Shards of built-in source ``name`` in ``cache_dir`` (written on first use); returns their folder."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; built-in sources: {', '.join(SOURCES)} "
                         "(or set data.train_urls to your own shards)")
    return SOURCES[name](cache_dir)


@dataclass(frozen=True)
class ShardSet:
    """The training and validation shards of a run, with what their index says about them."""

    train_urls: list[str]
    val_urls: list[str]
    train_samples: int
    classes: list[str]


def resolve_shards(data: DataConfig) -> ShardSet:
    """Locate the run's shards: ``data.train_urls``/``val_urls``, or the prepared built-in ``data.source``.

    Sample counts come from the index beside the shards; a shard that the index does not list
    is an error (the epoch length would be wrong).
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
    index = read_index(index_path or Path(train_urls[0]).parent / INDEX_NAME)
    counts = {name: count for split in index["splits"].values() for name, count in zip(split["shards"], split["counts"])}
    unlisted = [url for url in train_urls if Path(url).name not in counts]
    if unlisted:
        raise ValueError(f"{len(unlisted)} training shards are not in the index (first: {unlisted[0]}); "
                         "rewrite the index with 'trivit shards' or point data.index at the right one")
    missing = [url for url in train_urls if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} training shards do not exist (first: {missing[0]}); check data.train_urls")
    return ShardSet(train_urls=train_urls, val_urls=expand_urls(val) if val else [],
                    train_samples=sum(counts[Path(url).name] for url in train_urls), classes=list(index["classes"]))
