"""The shards against their index and against the run, at start-up (cheap: a stat per local shard and
one read of the first training shard).

An index that does not describe its shards stretches or shrinks every epoch and schedule; validation
shards of another class list score against other labels; validation shards that are the training
shards score the training set; an image of another channel count is converted in silence. Each of
these stops the run, or is said once (evaluating on training shards may be meant), before anything trains.
"""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

from PIL import Image

from trivit.datasets.shards import INDEX_NAME, read_index
from trivit.datasets.sources import ShardSet, is_local
from trivit.datasets.stream import IMAGE_KEYS

log = logging.getLogger(__name__)

EMPTY_TAR_BYTES = 10240
"""A tar archive with no member is its end blocks alone: at most this many bytes."""


def check_shards(shards: ShardSet, in_chans: int, img_size: int) -> None:
    """Every check of this module, on the local shards (``pipe:`` and remote shards are read as they come)."""
    local = [url for url in shards.train_urls if is_local(url)]
    check_no_empty_shards(local, shards.shard_counts)
    if local:
        first = local[0]
        samples, image = read_first_shard(first)
        listed = shards.shard_counts.get(first)
        if listed is not None and samples != listed:
            raise ValueError(f"the index says {first} holds {listed} samples; it holds {samples}. The index describes "
                             "other shards (data.index of another dataset?) and every epoch would be that much off: "
                             "rewrite the shards with 'trivit shards', or point data.index at their own index")
        if image is not None:
            say_conversion(image, in_chans, img_size, first)
    check_validation(shards)


def check_no_empty_shards(urls: list[str], counts: dict[str, int]) -> None:
    empty = [url for url in urls if counts.get(url, 0) > 0 and Path(url).stat().st_size <= EMPTY_TAR_BYTES]
    if empty:
        raise ValueError(f"{len(empty)} training shards hold no sample although the index lists samples in them "
                         f"(first: {empty[0]}, {counts[empty[0]]} listed); a copy was cut short? Restore them, or "
                         "rewrite the shards with 'trivit shards'")


def read_first_shard(url: str) -> tuple[int, Image.Image | None]:
    """The samples (distinct keys with a class) of a local shard, and its first image (header only)."""
    classes, image = set(), None
    with tarfile.open(url) as tar:
        for member in tar:
            key, _, field = member.name.partition(".")
            if field == "cls":
                classes.add(key)
            elif image is None and field in IMAGE_KEYS:
                data = tar.extractfile(member)
                image = Image.open(io.BytesIO(data.read())) if data is not None else None
    return len(classes), image


def say_conversion(image: Image.Image, in_chans: int, img_size: int, url: str) -> None:
    """Images of another channel count than the model's are converted: say so once, at start-up."""
    channels = len(image.getbands()) if image.mode not in ("I;16", "I", "F") else 1
    if channels != in_chans:
        log.warning("the shards hold %s images of %d channel(s) (%s, %dx%d); the model takes %d channel(s) "
                    "(model.in_chans): every image is converted to %s. If that is not meant, set model.in_chans=%d "
                    "(and data.mean/std to %d values)", image.mode, channels, Path(url).name, *image.size, in_chans,
                    "grayscale" if in_chans == 1 else "RGB", min(channels, 3), min(channels, 3))
    if max(image.size) != img_size:
        log.info("the shards' images are %dx%d (%s); the model takes %dx%d: the data transforms resize them",
                 *image.size, Path(url).name, img_size, img_size)


def check_validation(shards: ShardSet) -> None:
    """Validation shards that are training shards, or of another class list, would score nothing meaningful."""
    same = sorted(set(map(resolved, shards.val_urls)) & set(map(resolved, shards.train_urls)))
    if same:
        log.warning("data.val_urls names %d training shards (first: %s): eval_top1 will be accuracy on training "
                    "images, not held-out ones; point data.val_urls at the validation split unless that is meant",
                    len(same), same[0])
    index = next((Path(url).parent / INDEX_NAME for url in shards.val_urls
                  if is_local(url) and (Path(url).parent / INDEX_NAME).is_file()), None)
    if index is not None:
        classes = read_index(index)["classes"]
        if classes != shards.classes:
            raise ValueError(f"the validation shards' index {index} lists other classes than the training shards' "
                             f"({classes[:4]}... against {shards.classes[:4]}...): every evaluation would score "
                             "against other labels. Point data.val_urls at the validation split of the training data")


def resolved(url: str) -> str:
    return str(Path(url).resolve()) if is_local(url) else url
