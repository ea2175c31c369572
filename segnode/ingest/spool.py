"""The spool: received bytes become durable files before anything is acknowledged.

Its folders (tmp/, spool/, superseded/) are named in segnode.datadir.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar, cast

from segnode.datadir import DataDir, fsync_dir
from segnode.dicom.uids import is_valid_uid

log = logging.getLogger(__name__)
T = TypeVar("T")


_HELPERS = 16  # hashes and fsyncs under way at once (about two per association or request receiving)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
MAX_QUEUED = 16  # chunks waiting for the hash thread; beyond it the writer waits (back-pressure)


def helpers() -> ThreadPoolExecutor:
    """The helper threads (made on first use) that hash, flush and prepare files beside the receiving threads."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_HELPERS, thread_name_prefix="spool-helper")
        return _pool


def _start(fn: Callable[[T], object], arg: T, inline: bool) -> Future[None]:
    """`fn(arg)` on a helper thread, or at once on this one when `inline` (nothing to wait for, e.g. no fsync);
    the Future raises what it raised."""
    if not inline:
        return cast("Future[None]", helpers().submit(fn, arg))
    done: Future[None] = Future()
    try:
        fn(arg)
    except Exception as exc:
        done.set_exception(exc)
    else:
        done.set_result(None)
    return done


def _nothing(_: object) -> None:
    pass


def _writeback_starter() -> Callable[[int, int, int], object] | None:
    """Linux's sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE): start writing a range out without
    waiting for it (as PostgreSQL's *_flush_after settings do); None where libc has no such function."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)


_start_writeback = _writeback_starter()


class BackgroundHash:
    """SHA-256 of the chunks passed to `update`, in order, computed on a helper thread while the caller goes
    on receiving (hashlib releases the GIL): a 512 KB slice costs ~0.3 ms of hashing, off the critical path.
    `after(offset, length)`, if given, runs on that thread after each chunk (the spool writer starts writing
    the chunk out to disk there, so that the final fsync has little left to wait for).

    Chunks are kept until hashed, so they must not change after `update` (bytes, or a buffer the caller
    does not reuse); at most MAX_QUEUED wait, past that `update` waits for the helper (back-pressure).
    """

    def __init__(self, after: Callable[[int, int], object] | None = None) -> None:
        self._hash = hashlib.sha256()
        self._after = after
        self._offset = 0
        self._queue: deque[bytes | memoryview] = deque()
        self._cond = threading.Condition()
        self._draining = False  # a helper task owns the queue
        self._error: BaseException | None = None

    def update(self, chunk: bytes | memoryview) -> None:
        with self._cond:
            while len(self._queue) >= MAX_QUEUED:
                self._cond.wait()
            self._queue.append(chunk)
            if not self._draining:
                self._draining = True
                helpers().submit(self._drain)

    def _drain(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._queue:  # decided under the lock that `update` appends under
                        self._draining = False
                        self._cond.notify_all()
                        return
                    chunks = list(self._queue)  # all that waits: one hand-off, one write-out per batch
                length = 0
                for chunk in chunks:
                    self._hash.update(chunk)
                    length += len(chunk)
                if self._after is not None:
                    self._after(self._offset, length)
                self._offset += length
                with self._cond:
                    for _ in chunks:
                        self._queue.popleft()
                    self._cond.notify_all()
        except BaseException as exc:  # never leave a waiter hanging: `hexdigest` raises it instead
            with self._cond:
                self._error = exc
                self._queue.clear()
                self._draining = False
                self._cond.notify_all()

    def hexdigest(self) -> str:
        """The digest of everything passed to `update` (waits for the helper to finish).

        Raises:
            RuntimeError: the helper failed (its exception is the cause).
        """
        with self._cond:
            while self._draining:
                self._cond.wait()
        if self._error is not None:
            raise RuntimeError("hashing the received bytes failed") from self._error
        return self._hash.hexdigest()


SENDER_XATTR = "user.segnode.sender"  # who sent a spool file: start-up recovery indexes it under that sender


class SpoolWriter:
    """Write a temp file, hashing it on a helper thread; `finish` makes it durable (fsync) while the caller
    checks it.

    `sender` (bytes, e.g. segnode.ingest.store.Peer.record) is kept in the file's extended attribute
    SENDER_XATTR where the file system has them: the file alone then says what its index row said.

    The file is created exclusively (mode 0640) at `path`; `size` counts the bytes written. It ends with
    `finish` then `close`, or with `abort` (which may also follow them).
    """

    def __init__(self, path: Path, fsync: bool, sender: bytes = b"") -> None:
        self.path, self._fsync = path, fsync
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self.size = 0
        self.hash = BackgroundHash(self._write_out if fsync and _start_writeback is not None else None)
        self.sender_recorded = False  # `sender` is in the file's SENDER_XATTR, durable with its data
        if sender:
            try:
                os.setxattr(self.fd, SENDER_XATTR, sender)
                self.sender_recorded = True
            except OSError:  # no user xattrs on this file system (or too long): commits are flushed at once
                pass

    def write(self, data: bytes | memoryview) -> None:
        """Append all of `data` (looping over short writes); `data` must not change afterwards (it is hashed
        on a helper thread, see BackgroundHash).

        Raises:
            OSError: the write failed (e.g. ENOSPC); the caller aborts and refuses with 0xA700.
        """
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.hash.update(data)
        self.size += len(data)

    def finish(self) -> Future[None]:
        """Start making the file durable (fsync, when configured) on a helper thread, without waiting for the
        hash: the caller walks the file meanwhile (the page cache has it), then takes `hash.hexdigest()` and
        waits for the Future before placing it, and `close`s. An fsync takes ~0.4 ms per 512 KB slice here,
        as long as the rest of the checks.

        Returns:
            A Future whose `result()` returns once the file's bytes are durable, or raises the OSError of a
            failed fsync (the file is left for `abort`).
        """
        return _start(self._flush if self._fsync else _nothing, self.fd, inline=not self._fsync)

    @staticmethod
    def _flush(fd: int) -> None:
        os.fsync(fd)

    def close(self) -> None:
        """Close the descriptor once the hash helper is done with it (after `finish`'s Future is done)."""
        try:
            self.hash.hexdigest()
        except RuntimeError:  # it failed: done with the descriptor all the same
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _write_out(self, offset: int, length: int) -> None:
        fd = self.fd
        if fd >= 0:  # `finish` and `abort` wait for the hash, so the descriptor is this file's
            _start_writeback(fd, offset, length)  # type: ignore[misc]

    def abort(self) -> None:
        """Close (if still open) and delete the temp file; safe to call after `finish` (once its Future is
        done) or twice."""
        self.close()
        self.path.unlink(missing_ok=True)


class Spool:
    """The spool folders of a data directory (see segnode.datadir), created if missing.

    With `fsync` off (storage.fsync: false) neither files nor renames are fsynced: faster, but a power
    loss may lose acknowledged instances.
    """

    def __init__(self, data: DataDir, fsync: bool = True) -> None:
        self.root = data.root
        self.fsync = fsync
        self.tmp, self.objects, self.superseded = data.tmp, data.spool, data.superseded
        for d in (self.tmp, self.objects, self.superseded):
            d.mkdir(parents=True, exist_ok=True)

    def writer(self, sender: bytes = b"") -> SpoolWriter:
        """A new temp file tmp/<random hex>.part (see SpoolWriter for `sender`)."""
        return SpoolWriter(self.tmp / f"{uuid.uuid4().hex}.part", self.fsync, sender)

    @staticmethod
    def sender(path: Path) -> bytes:
        """The sender recorded with a spool file, b"" when none was (or the file system has no xattrs)."""
        try:
            return os.getxattr(path, SENDER_XATTR)
        except OSError:
            return b""

    def clean_tmp(self) -> int:
        """Remove partial files left by a crash; they were never acknowledged.

        Only safe before any writer starts (at start-up): it removes every file in tmp/.

        Returns:
            How many files were removed.
        """
        count = 0
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
            count += 1
        return count

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """'spool/<study>/<series>/<sop instance>.dcm', relative to the data directory.

        Raises:
            ValueError: a UID is not a valid UID (which could otherwise name a path such as '..').
        """
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):  # the only gate between a UID and the file system
                raise ValueError(f"not a valid UID: {uid[:80]!r}")
        return f"spool/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def sync_dir(self, path: Path) -> None:
        """Make renames in directory `path` durable (when fsync is on)."""
        if self.fsync:
            fsync_dir(path)

    def _ensure_dir(self, path: Path) -> None:
        if path.is_dir():
            return
        self._ensure_dir(path.parent)
        path.mkdir(exist_ok=True)
        self.sync_dir(path.parent)

    def place(self, tmp_path: Path, relative: str) -> Path:
        """Atomically move a finished temp file to its final name and make the rename durable (its directory is
        fsynced on this thread: the caller has nothing to do meanwhile).

        Args:
            tmp_path: a finished temp file (see `SpoolWriter.finish`), already durable.
            relative: the target, from `relative_path`; an existing file there is replaced.

        Returns:
            The absolute path of the placed file.

        Raises:
            OSError: the rename, or the directory's fsync, failed (the file may then be at its final name).
        """
        final = self.root / relative
        self._ensure_dir(final.parent)
        os.replace(tmp_path, final)
        self.sync_dir(final.parent)
        return final

    @staticmethod
    def aside_name(sop_uid: str, version: int, sha256: str) -> str:
        """The name `set_aside` gives a version in superseded/: '<sop uid>.v<version>.<sha256[:16]>.dcm'."""
        return f"{sop_uid}.v{version}.{sha256[:16]}.dcm"

    @staticmethod
    def parse_aside(name: str) -> tuple[str, int, str] | None:
        """(SOP Instance UID, version, first 16 hex digits of the sha256) from an `aside_name`; None for
        another name (or one whose UID is not valid)."""
        m = re.fullmatch(r"(.+)\.v(\d+)\.([0-9a-f]{16})\.dcm", name)
        return (m.group(1), int(m.group(2)), m.group(3)) if m and is_valid_uid(m.group(1)) else None

    def set_aside(self, relative: str, sop_uid: str, version: int, sha256: str) -> str:
        """Move an older version out of the way, before different bytes replace it.

        Returns:
            Its new path relative to the data directory, 'superseded/<sop uid>.v<version>.<sha256[:16]>.dcm';
            or 'missing:<relative>' when the file was already gone (logged; nothing moved).
        """
        target = f"superseded/{self.aside_name(sop_uid, version, sha256)}"
        if not (self.root / relative).exists():
            log.error("the stored file %s of version %d is missing; nothing to keep aside", relative, version)
            return f"missing:{relative}"
        os.replace(self.root / relative, self.root / target)
        self.sync_dir(self.superseded)
        return target

    def free_mb(self) -> float:
        """Free space on the data directory's file system, in MiB (1024 * 1024 bytes)."""
        return shutil.disk_usage(self.root).free / (1024 * 1024)
