"""Advisory file locks (``flock``) shared by processes of one node, or of several on a shared filesystem.

The kernel releases a process's locks when it exits, however it exits, so a lock is never
left behind by a crashed or killed process.
"""
from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def exclusive(path: str | Path, waiting_message: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block; wait for it if another
    process holds it, logging ``waiting_message`` once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s", waiting_message)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
