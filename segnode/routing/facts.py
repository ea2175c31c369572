"""What routing rules see about a series, gathered from its DICOM headers (never the pixels)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from pydicom import dcmread
from pydicom.dataset import Dataset

from segnode.routing.rules import Facts

_SKIPPED_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}  # sequences and bulk data: not rule material


def attributes(ds: Dataset) -> dict[str, Any]:
    """Top-level attributes by keyword (values as pydicom gives them: str, int, float, MultiValue,
    PersonName...); sequences, bulk data (OB/OW/...) and private or unknown tags left out."""
    return {e.keyword: e.value for e in ds if e.keyword and e.VR not in _SKIPPED_VRS}


def dimensions(first: Dataset, instances: int) -> int:
    """3 for a stack of slices or a multi-frame volume; 2 for single images (DX, CR, one slice).

    A stack: more than one instance and the first has Image Position (Patient); without it (e.g. a
    series of radiographs) several instances are still 2D.
    """
    if instances > 1 and "ImagePositionPatient" in first:
        return 3
    return 3 if int(first.get("NumberOfFrames", 1) or 1) > 1 else 2


def facts_for(first: Dataset, instances: int, ae_title: str | None = None, ip: str | None = None) -> Facts:
    """From a representative (the first) header and the series' instance count.

    Args:
        first: the header (pixels need not be read).
        instances: how many instances the series has.
        ae_title: the sender's calling AE title; None when unknown (STOW-RS, files).
        ip: the sender's IP address; None when unknown.
    """
    return Facts(attributes(first), instances, dimensions(first, instances), ae_title, ip)


def _dicom_files(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in candidates:
            with file.open("rb") as fh:
                if fh.read(132)[128:132] == b"DICM":
                    yield file


def series_in(paths: Iterable[Path]) -> dict[str, tuple[Facts, list[Path]]]:
    """Series found under the paths (files or folders, searched recursively), by Series Instance UID.

    Only PS3.10 files ('DICM' at byte 128) are read, headers only; their senders are unknown.

    Returns:
        Series Instance UID ("" for files without one) -> (facts, its files in the order found).

    Raises:
        OSError: a path cannot be read (a missing path reads as a file and fails).
        Exception: pydicom's error for a file marked DICM whose header cannot be parsed.
    """
    headers: dict[str, list[Dataset]] = defaultdict(list)
    files: dict[str, list[Path]] = defaultdict(list)
    for file in _dicom_files(paths):
        ds = dcmread(file, stop_before_pixels=True)
        uid = str(ds.get("SeriesInstanceUID", ""))
        headers[uid].append(ds)
        files[uid].append(file)
    return {uid: (facts_for(hs[0], len(hs)), files[uid]) for uid, hs in headers.items()}
