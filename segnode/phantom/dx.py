"""2D chest radiograph phantom (DX, PA): lungs, heart, ribs, clavicles, spine, varying exposure.

The image is a projection model: each structure adds attenuation (lungs remove it), the sum is
blurred, put through a random exposure curve and noise, and stored as MONOCHROME2 (bone bright).
Columns run toward the patient's left and rows toward the feet (Patient Orientation L\\F).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation
from scipy.ndimage import gaussian_filter

from segnode.phantom.dicom import base_dataset, deterministic_uid, set_pixels
from segnode.phantom.fields import SmoothField, rotation

LABELS = {1: "lung_right", 2: "lung_left", 3: "heart", 4: "clavicles"}


@dataclass
class DXOptions:
    matrix: int = 512
    fov_mm: float | None = None  # 350-420 mm; the pixel spacing follows from the matrix
    noise: float | None = None  # relative noise 0.01-0.04


@dataclass
class DXPhantom:
    seed: int
    options: DXOptions
    dataset: Dataset
    labels: np.ndarray  # uint8 [row, col]
    label_names: dict[int, str] = field(default_factory=lambda: dict(LABELS))


def _blob(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, center: tuple[float, float],
          axes: tuple[float, float], deform: float, power: float = 2.0, angle: float = 0.0) -> np.ndarray:
    """Inside test of a deformed super-ellipse."""
    d = SmoothField(rng, 2, deform, wavelength=max(axes) * 1.2, outputs=2)(np.stack([x, y], -1))
    r = rotation(rng, (angle,)) if angle else np.eye(2)
    u = np.stack([x + d[..., 0] - center[0], y + d[..., 1] - center[1]], -1) @ r
    grow = rng.uniform(0.9, 1.1, size=2)
    return (np.abs(u[..., 0] / (axes[0] * grow[0])) ** power + np.abs(u[..., 1] / (axes[1] * grow[1])) ** power) < 1


def _band(x: np.ndarray, y: np.ndarray, curve: np.ndarray, x_range: tuple[float, float], thickness: float) -> np.ndarray:
    """Pixels within thickness/2 of y = curve(x) for x in x_range."""
    lo, hi = x_range
    return (np.abs(y - curve) < thickness / 2) & (x > min(lo, hi)) & (x < max(lo, hi))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def generate_dx(seed: int, options: DXOptions | None = None, patient_id: str | None = None) -> DXPhantom:
    """One PA chest radiograph and its label map, deterministic by seed."""
    opts = options or DXOptions()
    rng = np.random.default_rng(seed)
    spacing = float(np.round((opts.fov_mm or rng.uniform(350, 420)) / opts.matrix, 4))
    n = opts.matrix
    coords = (np.arange(n) - (n - 1) / 2) * spacing
    x, y = np.meshgrid(coords, coords)  # x toward the patient's left, y toward the feet (mm)
    s = rng.uniform(0.85, 1.1)  # patient size
    x, y = (x - rng.uniform(-15, 15)) / s, (y - rng.uniform(-20, 10)) / s

    thorax = _blob(x, y, rng, (0, 20), (170, 260), 6, power=2.6)
    lung_r = _blob(x, y, rng, (-72, -5), (62, 118), 7, power=2.3, angle=6) & (y < 110 + 0.002 * x**2)
    lung_l = _blob(x, y, rng, (72, 5), (58, 112), 7, power=2.3, angle=6) & (y < 118 + 0.002 * x**2)
    heart = _blob(x, y, rng, (20, 48), (66, 54), 5, angle=20)
    spine = np.abs(x) < 22
    ribs = np.zeros_like(thorax)
    for k in range(10):
        y0 = -115 + k * rng.uniform(21, 25)
        for side in (-1, 1):
            curve = y0 + 0.0022 * x**2 + 0.12 * np.abs(x)  # posterior ribs slope down laterally
            ribs |= _band(x, y, curve, (side * 12, side * 150), rng.uniform(8, 11))
    clavicles = np.zeros_like(thorax)
    for side in (-1, 1):
        curve = -140 + rng.uniform(-8, 8) + 0.0018 * x**2 - side * 0.05 * x
        clavicles |= _band(x, y, curve, (side * 18, side * 135), rng.uniform(11, 14))

    att = 1.0 * thorax
    att -= 0.75 * ((lung_r | lung_l) & ~heart)
    att += 0.08 * heart + 0.35 * spine * thorax + 0.30 * ribs * thorax + 0.45 * clavicles * thorax
    att += SmoothField(rng, 2, 0.05, wavelength=30.0, components=12)(np.stack([x, y], -1))[..., 0] * thorax
    att = gaussian_filter(att, sigma=1.2 / spacing)
    gamma, gain = rng.uniform(0.8, 1.25), rng.uniform(0.75, 1.25)
    image = gain * np.clip(att + 0.05, 0, None) ** gamma
    noise = opts.noise or rng.uniform(0.01, 0.04)
    image += np.random.default_rng([seed, 1]).normal(0, noise, size=image.shape)
    pixels = np.clip(image / 1.8 * 4095, 0, 4095).astype(np.uint16)

    labels = np.zeros((n, n), dtype=np.uint8)
    labels[clavicles & ~(lung_r | lung_l)] = 4
    labels[lung_r] = 1
    labels[lung_l] = 2
    labels[heart] = 3

    study_uid, series_uid, sop_uid = (deterministic_uid(rng) for _ in range(3))
    ds = base_dataset(DigitalXRayImageStorageForPresentation, sop_uid, "DX", study_uid=study_uid,
                      series_uid=series_uid, patient_name=f"Phantom^DX{seed}",
                      patient_id=patient_id or f"PHANTOM-DX-{seed}", series_number=1, instance_number=1,
                      series_description="Synthetic chest radiograph phantom (segnode)")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]
    ds.ViewPosition, ds.BodyPartExamined = "PA", "CHEST"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "synthetic phantom: detector plane"
    ds.ImageLaterality, ds.PositionerType = "U", "COLUMN"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AnatomicRegionSequence = [_code("43799004", "SCT", "Chest")]
    ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]
    ds.AcquisitionContextSequence = []
    ds.KVP, ds.ExposureInuAs, ds.DistanceSourceToDetector = 120, int(gain * 2000), 1800
    ds.DetectorType, ds.AcquisitionNumber = "DIRECT", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.LossyImageCompression = "00"
    set_pixels(ds, pixels, bits_stored=12)
    return DXPhantom(seed, opts, ds, labels)


def write_dx(phantom: DXPhantom, out: Path) -> Path:
    """Write dx.dcm and labels.npz (labels, pixel spacing, names)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dx.dcm"
    phantom.dataset.save_as(path, enforce_file_format=True)
    np.savez_compressed(out / "labels.npz", labels=phantom.labels,
                        pixel_spacing=np.array([float(v) for v in phantom.dataset.PixelSpacing]),
                        names=np.array([f"{k}:{v}" for k, v in phantom.label_names.items()]))
    (out / "phantom.json").write_text(json.dumps({"generator": "dx", "seed": phantom.seed,
                                                  "options": dataclasses.asdict(phantom.options)}) + "\n")
    return path
