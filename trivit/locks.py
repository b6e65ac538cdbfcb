"""Exclusive file locks between processes, of one node or of several on a shared filesystem.

POSIX record locks (``lockf``): the kernel releases them when their process exits, however it
exits, so a crashed or killed process never leaves a stale lock; and they belong to the process
alone, so children it forks (loader workers) do not keep a lock alive after it died.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class InUse(OSError):
    """The lock is held by another process."""


@contextmanager
def exclusive(path: str | Path, waiting_message: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block; wait for it if another
    process holds it, logging ``waiting_message`` once."""
    with _lock_file(path) as fd:
        if not _try_lock(fd):
            log.info("%s", waiting_message)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        yield


@contextmanager
def exclusive_or_fail(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, or raise :class:`InUse` at once if another
    process holds it. The holder's pid is written into the file so that the error can name it."""
    with _lock_file(path) as fd:
        if not _try_lock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise InUse(f"{what} is in use by another process (pid {holder}; lock file {path})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield


@contextmanager
def _lock_file(path: str | Path) -> Iterator[int]:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise OSError(f"cannot create {path} ({error.strerror or error}): choose a folder you can write") from None
    try:
        yield fd
    finally:
        os.close(fd)


HELD = (errno.EAGAIN, errno.EACCES)
"""What ``lockf`` answers when another process holds the lock."""
UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
"""What it answers on a filesystem without POSIX locks (some NFS mounts, FUSE, object-store mounts)."""


def _try_lock(fd: int) -> bool:
    """Take the lock if free; False if another process holds it. A filesystem that cannot lock at all
    is reported once as a warning and counts as taken (the run goes on unprotected)."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in UNSUPPORTED:
            log.warning("this filesystem cannot lock files (%s): trivit cannot stop two runs from sharing the "
                        "folder; make sure only one runs there", os.strerror(error.errno))
            return True
        if error.errno in HELD:
            return False
        raise
    return True
