"""DICOM series <-> volume with geometry: array axes (slice, row, column), spacing in mm, and the
affine from array index to patient coordinates (LPS)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom import dcmread


@dataclass
class Volume:
    array: np.ndarray  # float32, [slice, row, col] (3D) or [row, col] (2D), rescaled values (HU for CT)
    spacing: tuple[float, ...]  # mm along each array axis; for a tilted stack, the distance between planes
    affine: np.ndarray  # 4x4 (3D) or 3x3 (2D): array index -> patient mm (LPS)
    order: list[int]  # index into the input paths of each slice, in array order


def _pixels(ds) -> np.ndarray:  # type: ignore[no-untyped-def]
    return ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0))


def read_series(paths: Sequence[Path], sort: bool = True) -> Volume:
    """Stack a single-frame series; sorted along the slice normal unless `sort` is False."""
    datasets = [dcmread(p) for p in paths]
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    order = list(range(len(datasets)))
    if sort:
        order.sort(key=lambda i: float(np.dot(np.array(datasets[i].ImagePositionPatient, float), normal)))
    datasets = [datasets[i] for i in order]
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    dr, dc = (float(v) for v in datasets[0].PixelSpacing)
    step = (positions[-1] - positions[0]) / (len(positions) - 1) if len(positions) > 1 else normal * float(
        getattr(datasets[0], "SliceThickness", 1.0))
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = step, col_dir * dr, row_dir * dc, positions[0]
    dz = abs(float(np.dot(step, normal))) or float(getattr(datasets[0], "SliceThickness", 1.0))
    return Volume(np.stack([_pixels(ds) for ds in datasets]), (dz, dr, dc), affine, order)


def read_image(path: Path) -> Volume:
    """A single 2D image (e.g. DX): [row, col] with its pixel spacing."""
    ds = dcmread(path)
    spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None) or [1.0, 1.0]
    dr, dc = (float(v) for v in spacing)
    return Volume(_pixels(ds), (dr, dc), np.diag([dr, dc, 1.0]), [0])
