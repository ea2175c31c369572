"""The spool: received bytes become durable files before anything is acknowledged.

Its folders (tmp/, spool/, superseded/) are named in segnode.datadir.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

from segnode.datadir import DataDir
from segnode.dicom.uids import is_valid_uid

log = logging.getLogger(__name__)


class SpoolWriter:
    """Write a temp file, hashing as it goes; `finish` makes it durable (fsync) before commit.

    The file is created exclusively (mode 0640) at `path`; `size` counts the bytes written. Exactly one
    of `finish` or `abort` ends it.
    """

    def __init__(self, path: Path, fsync: bool) -> None:
        self.path, self._fsync = path, fsync
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append all of `data` (looping over short writes).

        Raises:
            OSError: the write failed (e.g. ENOSPC); the caller aborts and refuses with 0xA700.
        """
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.hash.update(data)
        self.size += len(data)

    def finish(self) -> str:
        """fsync (when configured), close, and return the SHA-256 of everything written.

        Returns:
            The hex digest (64 characters) of the whole file, our file meta included.

        Raises:
            OSError: fsync failed; the descriptor is closed anyway, the file is left for `abort`.
        """
        try:
            if self._fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
        return self.hash.hexdigest()

    def abort(self) -> None:
        """Close (if still open) and delete the temp file; safe to call after `finish` or twice."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
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

    def writer(self) -> SpoolWriter:
        """A new temp file tmp/<random hex>.part."""
        return SpoolWriter(self.tmp / f"{uuid.uuid4().hex}.part", self.fsync)

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

    def _fsync_dir(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, path: Path) -> None:
        if path.is_dir():
            return
        self._ensure_dir(path.parent)
        path.mkdir(exist_ok=True)
        self._fsync_dir(path.parent)

    def place(self, tmp_path: Path, relative: str) -> Path:
        """Atomically move a finished temp file to its final name and make the rename durable.

        Args:
            tmp_path: a finished temp file (see `SpoolWriter.finish`).
            relative: the target, from `relative_path`; an existing file there is replaced.

        Returns:
            The absolute path of the placed file.
        """
        final = self.root / relative
        self._ensure_dir(final.parent)
        os.replace(tmp_path, final)
        self._fsync_dir(final.parent)
        return final

    def set_aside(self, relative: str, sop_uid: str, version: int, sha256: str) -> str:
        """Move an older version out of the way, before different bytes replace it.

        Returns:
            Its new path relative to the data directory, 'superseded/<sop uid>.v<version>.<sha256[:16]>.dcm';
            or 'missing:<relative>' when the file was already gone (logged; nothing moved).
        """
        target = f"superseded/{sop_uid}.v{version}.{sha256[:16]}.dcm"
        if not (self.root / relative).exists():
            log.error("the stored file %s of version %d is missing; nothing to keep aside", relative, version)
            return f"missing:{relative}"
        os.replace(self.root / relative, self.root / target)
        self._fsync_dir(self.superseded)
        return target

    def free_mb(self) -> float:
        """Free space on the data directory's file system, in MiB (1024 * 1024 bytes)."""
        return shutil.disk_usage(self.root).free / (1024 * 1024)
