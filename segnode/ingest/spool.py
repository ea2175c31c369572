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
    """Write a temp file, hashing as it goes; `finish` makes it durable (fsync) before commit."""

    def __init__(self, path: Path, fsync: bool) -> None:
        self.path, self._fsync = path, fsync
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.hash.update(data)
        self.size += len(data)

    def finish(self) -> str:
        """fsync (when configured), close, and return the SHA-256 of everything written."""
        try:
            if self._fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
        return self.hash.hexdigest()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


class Spool:
    """The spool folders of a data directory (see segnode.datadir), created if missing."""

    def __init__(self, data: DataDir, fsync: bool = True) -> None:
        self.root = data.root
        self.fsync = fsync
        self.tmp, self.objects, self.superseded = data.tmp, data.spool, data.superseded
        for d in (self.tmp, self.objects, self.superseded):
            d.mkdir(parents=True, exist_ok=True)

    def writer(self) -> SpoolWriter:
        return SpoolWriter(self.tmp / f"{uuid.uuid4().hex}.part", self.fsync)

    def clean_tmp(self) -> int:
        """Remove partial files left by a crash; they were never acknowledged."""
        count = 0
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
            count += 1
        return count

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
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
        """Atomically move a finished temp file to its final name and make the rename durable."""
        final = self.root / relative
        self._ensure_dir(final.parent)
        os.replace(tmp_path, final)
        self._fsync_dir(final.parent)
        return final

    def set_aside(self, relative: str, sop_uid: str, version: int, sha256: str) -> str:
        """Move an older version out of the way; return its new relative path."""
        target = f"superseded/{sop_uid}.v{version}.{sha256[:16]}.dcm"
        if not (self.root / relative).exists():
            log.error("the stored file %s of version %d is missing; nothing to keep aside", relative, version)
            return f"missing:{relative}"
        os.replace(self.root / relative, self.root / target)
        self._fsync_dir(self.superseded)
        return target

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / (1024 * 1024)
