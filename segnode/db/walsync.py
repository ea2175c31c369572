"""Deferred durability for SQLite commits that can be rebuilt after a power loss.

A commit made with synchronous=NORMAL (WAL mode) survives a process crash at once, and a power loss
only once the WAL file has been flushed. `WalSync` flushes it on its own thread a moment later, grouping
the commits of that moment into one fdatasync; the audit trail advances its head anchor only over events
known to be on disk then (`capture` before the flush, `on_synced` after). The ingest path defers only commits that start-up recovery
can rebuild from their durable spool file (segnode.ingest.store), so an acknowledged instance is never
lost: it pays one flush (its file) instead of three.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class WalSync(Generic[T]):
    """Flushes an SQLite database's WAL file soon after deferred commits.

    Args:
        database: the SQLite database file (its WAL is "<database>-wal").
        capture: called just before each flush; what it returns is what the flush makes durable.
        on_synced: called with that after the flush, on the flushing thread (exceptions are logged).
        delay: s to wait after the first deferred commit before flushing, so that the commits of that
            moment share one flush.
    """

    def __init__(self, database: Path, capture: Callable[[], T], on_synced: Callable[[T], None],
                 delay: float = 0.02) -> None:
        self.wal = Path(f"{database}-wal")
        self.capture, self.on_synced, self.delay = capture, on_synced, delay
        self._due = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one flush at a time: `flush` from callers, the thread's own
        self._thread = threading.Thread(target=self._run, name="wal-sync", daemon=True)
        self._thread.start()

    def soon(self) -> None:
        """A deferred commit was made: flush within `delay` s (plus the flush itself)."""
        self._due.set()

    def flush(self) -> None:
        """Flush now, on the caller's thread: every commit made before this call is durable on return.

        Raises:
            OSError: the WAL file could not be flushed (the caller's commit is not known to be durable).
        """
        with self._lock:
            captured = self.capture()
            try:
                fd = os.open(self.wal, os.O_RDONLY)
            except FileNotFoundError:  # removed by the last connection's close, after a full checkpoint
                fd = -1
            if fd >= 0:
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            try:
                self.on_synced(captured)
            except Exception:
                log.exception("after flushing %s", self.wal)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._due.wait()
            if self._stop.is_set():
                return
            self._stop.wait(self.delay)
            self._due.clear()
            try:
                self.flush()
            except OSError:
                log.exception("could not flush the database's WAL file %s; the next commit retries. Check the "
                              "disk", self.wal)
                self._due.set()
                self._stop.wait(1.0)

    def close(self) -> None:
        """Stop the thread after a last flush (a clean stop leaves nothing deferred)."""
        self._stop.set()
        self._due.set()
        self._thread.join(timeout=10)
        try:
            self.flush()
        except OSError:
            log.exception("could not flush the database's WAL file %s at stop", self.wal)
