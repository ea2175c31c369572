"""The names of a job's result files, in one place for the code that writes them (inference, encoding),
delivers them (worker) and hashes them (lineage). Kept free of torch and highdicom, so `audit trace`
stays light."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS_FILE = "labels.nii.gz"
RECORD_FILE = "segmentation.json"
SEG_FILE, SR_FILE = "seg.dcm", "sr.dcm"


def dicom_names(record: dict[str, Any]) -> list[str]:
    """The DICOM files a job's record lists: SEG, SR and any contour images.

    Args:
        record: segmentation.json as a dict ({} for none: SEG and SR only).

    Returns:
        File names relative to the job's result folder.
    """
    return [SEG_FILE, SR_FILE, *record.get("outputs", {}).get("secondary_capture", [])]


def result_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The DICOM files a job's results hold, and the ones its record names that are missing.

    Args:
        folder: A job's result folder (with segmentation.json, if encoding got that far).

    Returns:
        (paths of the DICOM files the record names, those of them that are not there, as strings).

    Raises:
        json.JSONDecodeError: segmentation.json exists but is not JSON.
    """
    record = folder / RECORD_FILE
    files = [folder / name for name in dicom_names(json.loads(record.read_text()) if record.is_file() else {})]
    return files, [str(f) for f in files if not f.is_file()]
