"""Synthetic CT series for tests, the demo and the benchmarks.

A stand-in until the phantom generator lands: it writes geometrically valid CT slices
(IPP/IOP, spacing, rescale, frame of reference) with a cheap deterministic texture, so the
ingest path can be exercised at realistic sizes (512x512, 16 bit) without any downloaded data.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Iterator

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

_UID_ROOT = "1.2.826.0.1.3680043.10.1432."  # pydicom's documented example root plus a fixed suffix


def _uid(rng: np.random.Generator) -> str:
    return generate_uid(prefix=_UID_ROOT, entropy_srcs=[str(rng.integers(0, 2**63))])


def ct_series(
    n_slices: int = 16,
    rows: int = 64,
    cols: int = 64,
    seed: int = 0,
    patient_name: str = "Phantom^Test",
    patient_id: str = "PHANTOM-0001",
    study_uid: str | None = None,
) -> Iterator[Dataset]:
    """Yield the slices of one CT series, deterministic by `seed`."""
    rng = np.random.default_rng(seed)
    study_uid = study_uid or _uid(rng)
    series_uid, frame_uid = _uid(rng), _uid(rng)
    spacing, thickness = 0.7, 2.5
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = ((yy - rows / 2) / (rows * 0.42)) ** 2 + ((xx - cols / 2) / (cols * 0.45)) ** 2 < 1
    base = np.where(body, 1024 + 40, 24).astype(np.int32)
    today = _dt.date(2026, 1, 1).strftime("%Y%m%d")
    for i in range(n_slices):
        noise = rng.integers(-20, 21, size=(rows, cols), dtype=np.int32)
        pixels = np.clip(base + noise, 0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = _uid(rng)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC0001", "1", ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "segnode-synthetic", 1, i + 1
        ds.SeriesDescription, ds.BodyPartExamined = "Synthetic abdomen", "ABDOMEN"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-cols * spacing / 2, -rows * spacing / 2, -i * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], thickness
        ds.PositionReferenceIndicator, ds.KVP = "", 120
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = pixels.tobytes()
        yield ds


def write_ct_series(directory: Path, **kwargs: object) -> list[Path]:
    """Write a series as DICOM files named by instance number; return the paths in order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in ct_series(**kwargs):  # type: ignore[arg-type]
        path = directory / f"ct{int(ds.InstanceNumber):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
