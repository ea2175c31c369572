"""What lives in a node's data directory, named in one place.

    segnode.lock          held by the running node (one node per data directory; segnode.lock names it)
    segnode.db            the index, queue and audit trail (SQLite; PostgreSQL when database_url is set)
    audit.key             the key of the patient-identity hashes (made once, never leaves this folder)
    audit.head            the audit trail's head anchor
    tmp/                  files being received (never acknowledged; wiped at start)
    metrics/              Prometheus counters of `serve`'s processes (wiped at its start)
    atna/<name>.cursor    the last audit event each ATNA destination confirmed (segnode.audit.atna)
    spool/<study>/<series>/<sop>.dcm   stored instances (UIDs validated before a path is built)
    superseded/           older versions of instances replaced by different bytes
    results/<job id>/     a job's results: labels.nii.gz, segmentation.json, seg.dcm, sr.dcm, sc-NNNN.dcm

Kept free of torch and highdicom, so `audit trace` stays light.
"""

from __future__ import annotations

import json
import re
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS_FILE = "labels.nii.gz"
RECORD_FILE = "segmentation.json"
DETAIL_FILE = "detail.txt"  # in a result a remote worker returns: what the audit says; not kept
SEG_FILE, SR_FILE = "seg.dcm", "sr.dcm"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def database(self) -> Path:
        return self.root / "segnode.db"

    @property
    def audit_key(self) -> Path:
        return self.root / "audit.key"

    @property
    def audit_head(self) -> Path:
        return self.root / "audit.head"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def atna(self) -> Path:
        return self.root / "atna"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def superseded(self) -> Path:
        return self.root / "superseded"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def result_folder(self, job_id: int) -> Path:
        """Where job `job_id`'s results go."""
        return self.results / str(int(job_id))

    def path(self, relative: str) -> Path:
        """A path the index or the queue stores relative to the data directory."""
        return self.root / relative

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def fsync_dir(path: Path) -> None:
    """fsync a directory: renames and new names in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


RESULT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a file in a result folder: never a path


def dicom_names(record: dict[str, Any]) -> list[str]:
    """The DICOM files a job's record (segmentation.json) lists: SEG, SR and any contour images.

    Raises:
        ValueError: the record is not an object, or names something other than a plain file name (a path out
            of the folder must never be delivered).
    """
    if not isinstance(record, dict):
        raise ValueError("the result record is not a JSON object")
    outputs = record.get("outputs", {})
    extra = outputs.get("secondary_capture", []) if isinstance(outputs, dict) else None
    if not isinstance(extra, list) or not all(isinstance(n, str) and RESULT_NAME.match(n) for n in extra):
        raise ValueError("the result record's outputs.secondary_capture must list plain file names")
    return [SEG_FILE, SR_FILE, *extra]


def result_files(folder: Path) -> tuple[list[Path], list[str]]:
    """(the DICOM files a job's results hold, the ones its record names that are missing)."""
    record = folder / RECORD_FILE
    files = [folder / name for name in dicom_names(json.loads(record.read_text()) if record.is_file() else {})]
    return files, [str(f) for f in files if not f.is_file()]
