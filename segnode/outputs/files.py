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
    """The DICOM files a job's record (segmentation.json) lists: SEG, SR and any contour images."""
    return [SEG_FILE, SR_FILE, *record.get("outputs", {}).get("secondary_capture", [])]


def result_files(folder: Path) -> tuple[list[Path], list[str]]:
    """(the DICOM files a job's results hold, the ones its record names that are missing)."""
    record = folder / RECORD_FILE
    files = [folder / name for name in dicom_names(json.loads(record.read_text()) if record.is_file() else {})]
    return files, [str(f) for f in files if not f.is_file()]
