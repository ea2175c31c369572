"""Fast synthetic CT series for ingest tests and benchmarks.

The anatomical phantom (segnode.phantom.ct) takes ~60 ms per 256x256 slice; ingest only needs valid,
realistic-size CT slices (512x512, 16 bit, full geometry) quickly, so this draws an elliptic body
with noise and shares the phantom's DICOM modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from segnode.phantom.dicom import base_dataset, deterministic_uid, set_pixels


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
    study_uid = study_uid or deterministic_uid(rng)
    series_uid, frame_uid = deterministic_uid(rng), deterministic_uid(rng)
    spacing, thickness = 0.7, 2.5
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = ((yy - rows / 2) / (rows * 0.42)) ** 2 + ((xx - cols / 2) / (cols * 0.45)) ** 2 < 1
    base = np.where(body, 1024 + 40, 24).astype(np.int32)
    for i in range(n_slices):
        noise = rng.integers(-20, 21, size=(rows, cols), dtype=np.int32)
        ds = base_dataset(CTImageStorage, deterministic_uid(rng), "CT", study_uid=study_uid, series_uid=series_uid,
                          patient_name=patient_name, patient_id=patient_id, series_number=1, instance_number=i + 1,
                          series_description="Synthetic abdomen")
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.BodyPartExamined, ds.PatientPosition = "ABDOMEN", "FFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-cols * spacing / 2, -rows * spacing / 2, -i * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], thickness
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        set_pixels(ds, np.clip(base + noise, 0, 4095), bits_stored=12)
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


def poison_bytes(ds: Dataset, kind: str, implicit: bool = False) -> bytes:
    """The encoded dataset (no file meta) of `ds` without pixels, plus one element pydicom cannot decode
    though every header is well formed: "short-us" (a US value of one byte) or "unknown-vr" (VR 'ZZ',
    explicit VR only). The tag, (0052,0012), sorts after every other element of a generated CT."""
    import struct

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = ds.copy()
    del ds.PixelData
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    tag = struct.pack("<HH", 0x0052, 0x0012)
    if kind == "short-us":
        return fp.getvalue() + tag + (struct.pack("<I", 1) if implicit else b"US" + struct.pack("<H", 1)) + b"\x01"
    assert kind == "unknown-vr" and not implicit
    return fp.getvalue() + tag + b"ZZ" + struct.pack("<H", 2) + b"ab"


def signed_permutations(dims: int = 3) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
    """Every axis-aligned orientation of an array: 6 orders x 8 flips (48) in 3D, 2 x 4 (8) in 2D."""
    import itertools

    return [(perm, flips) for perm in itertools.permutations(range(dims))
            for flips in itertools.product((False, True), repeat=dims)]


def restored_ct(hu: np.ndarray, affine: np.ndarray, perm: tuple[int, ...], flips: tuple[bool, ...],
                folder: Path, series_uid: str = "") -> list[Path]:
    """The same CT voxels (identical HU at identical patient positions) stored in another orientation: the
    array's axes permuted and flipped (`Reorientation`), written as slices along the new first axis with
    Image Position/Orientation moved to match - an axial series with rows or columns reversed, a coronal or
    sagittal reformat, ... Returns the files in instance order."""
    from segnode.imaging.orientation import Reorientation

    turn = Reorientation(perm, flips)
    array = np.ascontiguousarray(turn.apply(hu))
    turned = affine @ turn.index_map(array.shape)
    rng = np.random.default_rng(abs(hash((perm, flips))) % 2**32)
    study_uid, series_uid = "1.2.826.0.1.3680043.10.1432.77.1", series_uid or deterministic_uid(rng)
    frame_uid = "1.2.826.0.1.3680043.10.1432.77.2"
    row_step, col_step = turned[:3, 1], turned[:3, 2]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(array.shape[0]):
        ds = base_dataset(CTImageStorage, deterministic_uid(rng), "CT", study_uid=study_uid, series_uid=series_uid,
                          patient_name="Phantom^Orientation", patient_id="PHANTOM-ORIENT", series_number=1,
                          instance_number=k + 1, series_description="Synthetic abdomen, re-stored")
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.BodyPartExamined, ds.PatientPosition, ds.ImageType = "ABDOMEN", "FFS", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [round(float(v), 4) for v in turned[:3, 3] + k * turned[:3, 0]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in
                                      [*(col_step / np.linalg.norm(col_step)), *(row_step / np.linalg.norm(row_step))]]
        ds.PixelSpacing = [round(float(np.linalg.norm(row_step)), 6), round(float(np.linalg.norm(col_step)), 6)]
        ds.SliceThickness = round(float(np.linalg.norm(turned[:3, 0])), 6)
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        set_pixels(ds, np.clip(np.rint(array[k]) + 1024, 0, 4095), bits_stored=12)
        paths.append(folder / f"ct{k + 1:05d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def canonical_labels(labels: np.ndarray, affine: np.ndarray, canonical_affine: np.ndarray) -> np.ndarray:
    """A label map of a volume stored in another axis-aligned orientation, put on the canonical volume's
    voxels (the same patient positions), by the signed permutation between the two affines."""
    from segnode.imaging.orientation import Reorientation

    m = np.linalg.inv(canonical_affine) @ affine  # index in this volume -> canonical index
    perm = tuple(int(np.argmax(abs(m[:3, i]))) for i in range(3))
    flips = tuple(bool(m[perm[i], i] < 0) for i in range(3))
    assert sorted(perm) == [0, 1, 2] and np.allclose(abs(m[:3, :3]).sum(axis=0), 1, atol=1e-3)
    return Reorientation(perm, flips).restore(labels)
