"""One node per data directory: an exclusive lock held for the node's lifetime.

Two nodes on one data directory would each take the other's in-flight temp files for a crash's leftovers
(start-up recovery removes them) and interleave the audit trail's head. The lock is `flock` on
DATA_DIR/segnode.lock, released by the kernel when the process ends however it ends (kill -9 too), so a
crash never leaves a stale lock; the file names the holder for the error a second node prints.
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from segnode.errors import ConfigurationError

LOCK_FILE = "segnode.lock"


class DataDirInUse(ConfigurationError):
    """Another running node holds the data directory."""


class DataDirLock:
    """The exclusive lock of a data directory (`acquire`, `release`; a context manager too)."""

    def __init__(self, root: Path) -> None:
        self.root, self.path = root, root / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write who holds it (pid, host, since).

        Raises:
            DataDirInUse: another process holds it (the message names it and what to do).
            OSError: the lock file cannot be created.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "holder unknown"
            os.close(fd)
            raise DataDirInUse(f"data directory {self.root} is in use by another segnode ({holder}); stop that "
                               f"node first, or give this one its own data_dir") from None
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (closing the descriptor releases it). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DataDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
