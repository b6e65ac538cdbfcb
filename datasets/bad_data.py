"""Unreadable samples and shards in a loader worker: skipped, counted and reported, never raised."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class BadData:
    """Counts and reports unreadable samples and shards in one loader worker; never raises.

    The counts travel with the next batch (:class:`Batch`), so the training process can log
    them and stop when too much of the data is bad.
    """

    WARN_FIRST = 20

    def __init__(self) -> None:
        self.skipped = 0
        self.bad_shards = 0
        self.reported = 0
        self.decoded = 0
        """Samples decoded so far (never reset): a pass that adds none has nothing usable."""
        self.last_error = ""

    def sample(self, sample: dict[str, Any], error: Exception) -> None:
        self.skipped += 1
        self.last_error = f"sample {sample.get('__key__')!r} of {sample.get('__url__')!r}: {error}"
        self._warn(f"skipping {self.last_error}")

    def shard(self, error: Exception) -> bool:
        """webdataset's handler for errors opening or reading a tar file: count, warn, go on."""
        self.bad_shards += 1
        self.last_error = f"{type(error).__name__}: {error}"
        self._warn(f"skipping the rest of a shard: {self.last_error}")
        return True

    def take(self) -> tuple[int, int]:
        counts = self.skipped, self.bad_shards
        self.skipped = self.bad_shards = 0
        return counts

    def _warn(self, message: str) -> None:
        self.reported += 1
        if self.reported <= self.WARN_FIRST or self.reported % 1000 == 0:
            log.warning("%s (bad items so far in this worker: %d)", message, self.reported)
