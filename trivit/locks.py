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


class InUse(OSError):
    """The lock is held by another process."""


@contextmanager
def exclusive_or_fail(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, or raise :class:`InUse` at once if another
    process holds it. The holder's pid is written into the file so that the error can name it; a
    file left by a dead process is not a lock (the kernel released it).

    A POSIX record lock (``lockf``), not ``flock``: it belongs to this process alone, so children
    forked while it is held (loader workers) do not keep it alive after this process dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise InUse(f"{what} is in use by another process (pid {holder}; lock file {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
