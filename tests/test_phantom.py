"""Phantoms: deterministic, valid DICOM (dciodvfy), and label maps that line up with the anatomy
in the geometry actually written, whatever the acquisition options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.phantom.dx import DXOptions, generate_dx, write_dx

SMALL = dict(matrix=64, slice_spacing=5.0, z_extent_mm=200.0)


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_ct_is_deterministic_by_seed():
    a, b, c = (generate_ct(s, CTOptions(**SMALL)) for s in (11, 11, 12))
    assert [d.PixelData for d in a.datasets] == [d.PixelData for d in b.datasets]
    assert np.array_equal(a.labels, b.labels)
    assert [d.SOPInstanceUID for d in a.datasets] == [d.SOPInstanceUID for d in b.datasets]
    assert a.datasets[0].PixelData != c.datasets[0].PixelData
    assert a.datasets[0].StudyInstanceUID != c.datasets[0].StudyInstanceUID


def test_ct_and_dx_pass_dciodvfy(tmp_path):
    ct = write_phantom(generate_ct(3, CTOptions(**SMALL, tilt_deg=10)), tmp_path / "ct")
    dx = write_dx(generate_dx(3, DXOptions(matrix=128)), tmp_path / "dx")
    for path in (ct[0], ct[len(ct) // 2], dx):
        assert dciodvfy_errors(path) == [], path


def _voxels_in_patient_space(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Read the written series back: (HU per voxel, patient coordinates per voxel), in file order."""
    hu, xyz = [], []
    for path in paths:
        ds = dcmread(path)
        pixels = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        row, col = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
        xyz.append(np.array(ds.ImagePositionPatient, float) + c[..., None] * dc * row + r[..., None] * dr * col)
        hu.append(pixels)
    return np.stack(hu), np.stack(xyz)


@pytest.mark.parametrize("geometry", [{}, {"reversed_order": True}, {"oblique_deg": 15.0}, {"tilt_deg": 15.0}],
                         ids=["axial", "reversed", "oblique", "tilted"])
def test_ct_labels_line_up_with_the_written_anatomy(tmp_path, geometry):
    phantom = generate_ct(5, CTOptions(**SMALL, **geometry))
    paths = write_phantom(phantom, tmp_path)
    saved = np.load(tmp_path / "labels.npz")
    labels = saved["labels"]
    hu, xyz = _voxels_in_patient_space(paths)
    assert labels.shape == hu.shape
    assert np.allclose(saved["positions"], [dcmread(p).ImagePositionPatient for p in paths], atol=1e-3)
    centroid = {k: xyz[labels == k].mean(axis=0) for k in range(1, 6)}
    mean_hu = {k: hu[labels == k].mean() for k in range(1, 6)}
    assert all((labels == k).sum() > 50 for k in range(1, 6))
    # LPS: +x is the patient's left, +y posterior
    assert centroid[1][0] < -20 < 20 < centroid[2][0]  # liver on the right, spleen on the left
    assert centroid[3][0] < 0 < centroid[4][0]  # right and left kidney
    assert centroid[5][1] > centroid[1][1] and abs(centroid[5][0]) < 20  # spine posterior, midline
    assert centroid[3][1] > centroid[1][1] and centroid[4][1] > centroid[1][1]  # kidneys posterior to the liver
    assert 35 < mean_hu[1] < 85 and 25 < mean_hu[2] < 75  # soft-tissue organs
    assert mean_hu[3] > 90 and mean_hu[4] > 90  # enhancing kidneys
    assert mean_hu[5] > 200  # bone
    assert hu[labels == 0].min() < -900  # air around the body


def test_ct_slice_spacing_and_counts_vary_with_the_seed():
    spacings = {round(float(generate_ct(s, CTOptions(matrix=16, z_extent_mm=40.0)).datasets[0].SliceThickness), 2)
                for s in range(6)}
    assert len(spacings) == 6 and min(spacings) >= 0.6 and max(spacings) <= 5.0


def test_dx_labels_line_up_with_the_image(tmp_path):
    dx = generate_dx(9, DXOptions(matrix=256))
    write_dx(dx, tmp_path)
    image = dcmread(tmp_path / "dx.dcm").pixel_array.astype(float)
    labels = np.load(tmp_path / "labels.npz")["labels"]
    cols = np.arange(labels.shape[1])
    # Patient Orientation L\F: columns run toward the patient's left
    assert cols[np.nonzero(labels == 1)[1]].mean() < labels.shape[1] / 2 < cols[np.nonzero(labels == 2)[1]].mean()
    lungs, heart, clavicles = image[(labels == 1) | (labels == 2)], image[labels == 3], image[labels == 4]
    assert lungs.mean() < heart.mean() and lungs.mean() < clavicles.mean()  # air dark, bone and heart bright
    assert np.nonzero(labels == 4)[0].mean() < np.nonzero(labels == 3)[0].mean()  # clavicles above the heart


def test_phantom_cli_writes_series_and_labels(tmp_path):
    result = subprocess.run([sys.executable, "-m", "segnode", "phantom", "ct", "--out", str(tmp_path), "--seed", "4",
                             "--count", "2", "--matrix", "32", "--slice-spacing", "5", "--z-extent", "60",
                             "--reversed"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for seed in (4, 5):
        folder = tmp_path / f"ct-{seed:05d}"
        files = sorted(folder.glob("ct*.dcm"))
        assert len(files) == 12 and np.load(folder / "labels.npz")["labels"].shape == (12, 32, 32)
        z = [float(dcmread(f).ImagePositionPatient[2]) for f in files]
        assert z == sorted(z, reverse=True)  # --reversed: instance 1 is the most superior
