"""3D abdominal CT phantom: body, liver, spleen, kidneys, spine, bowel, in a random acquisition.

Anatomy lives in patient space (LPS, mm) as smooth, randomly deformed implicit shapes; each slice
of the acquisition grid (random pixel and slice spacing, slice order, obliquity, gantry tilt) is
evaluated at its voxels' patient coordinates. The label map is therefore in the exact geometry of
the written series by construction.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from segnode.phantom.dicom import base_dataset, deterministic_uid, set_pixels
from segnode.phantom.fields import SmoothField, rotation

LABELS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "spine"}
AIR, FAT, SOFT = -1000.0, -95.0, 35.0
VISCERAL_FAT_LEVEL = 0.15  # mesentery field threshold: about 60 % of the viscera is fat


@dataclass(kw_only=True)
class CTOptions:
    """What the acquisition looks like. None means: drawn at random from the seed."""

    matrix: int = 256
    fov_mm: float | None = None  # 340-420
    slice_spacing: float | None = None  # 0.6-5.0 mm
    z_extent_mm: float | None = None  # 180-280 mm
    reversed_order: bool = False  # instance 1 is the most superior slice
    oblique_deg: float = 0.0  # random rotation of the image plane, up to this angle
    tilt_deg: float = 0.0  # gantry tilt about the patient's x axis (a sheared stack)
    noise_hu: float | None = None  # 8-25 HU


@dataclass(kw_only=True)
class CTPhantom:
    seed: int
    options: CTOptions
    datasets: list[Dataset]  # in instance order
    labels: np.ndarray  # uint8 [slice, row, col], same order as datasets
    hu: np.ndarray  # int16 [slice, row, col], what the pixels encode
    positions: np.ndarray  # [slice, 3] Image Position (Patient)
    orientation: np.ndarray  # [6] Image Orientation (Patient)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    label_names: dict[int, str] = field(default_factory=lambda: dict(LABELS))


class _Shape:
    """An ellipsoid (or elliptic cylinder along z) with a smooth random surface deformation."""

    def __init__(self, rng: np.random.Generator, center: tuple[float, float, float], axes: tuple[float, float, float],
                 deform_mm: float, tilt: tuple[float, ...] = (5, 5, 10), cylinder: bool = False,
                 scale: float = 0.15) -> None:
        grow = rng.uniform(1 - scale, 1 + scale, size=3)
        self.center = np.array(center, dtype=np.float32)
        self.axes = (np.array(axes) * grow).astype(np.float32)
        self.rot = rotation(rng, tilt).astype(np.float32)
        self.deform = SmoothField(rng, 3, deform_mm, wavelength=max(axes) * 1.5, outputs=3)
        self.cylinder = cylinder
        # the displacement never exceeds this: points farther out cannot be inside
        self.reach = self.axes + np.float32(np.sqrt(3) * self.deform.bound)

    def _r2(self, u: np.ndarray) -> np.ndarray:
        if self.cylinder:
            return u[..., 0] ** 2 + u[..., 1] ** 2
        return np.einsum("...i,...i->...", u, u)

    def radius2(self, q: np.ndarray) -> np.ndarray:
        """Squared normalized radius (< 1 inside); 4.0 where the point cannot be inside."""
        out = np.full(q.shape[:-1], 4.0, dtype=np.float32)
        near = self._r2((q - self.center) @ self.rot / self.reach) < 1
        if near.any():
            qn = q[near]
            out[near] = self._r2((qn + self.deform(qn) - self.center) @ self.rot / self.axes)
        return out


class _Anatomy:
    def __init__(self, rng: np.random.Generator) -> None:
        scale = rng.uniform(0.88, 1.12, size=3)
        self.pose = rotation(rng, (4, 4, 8)).astype(np.float32)
        self.offset = rng.uniform(-15, 15, size=3).astype(np.float32)
        self.scale = scale.astype(np.float32)
        self.body = _Shape(rng, (0, 0, 0), (165, 115, 1), 7, (0, 0, 5), cylinder=True, scale=0.08)
        self.liver = _Shape(rng, (-65, -5, 40), (88, 78, 72), 10)
        self.spleen = _Shape(rng, (88, 42, 55), (38, 28, 55), 5)
        self.kidney_r = _Shape(rng, (-72, 58, -15), (27, 23, 52), 4, (10, 10, 15))
        self.kidney_l = _Shape(rng, (72, 60, -5), (27, 23, 52), 4, (10, 10, 15))
        self.bowel = [_Shape(rng, (rng.uniform(-90, 90), rng.uniform(-70, 20), rng.uniform(-110, 10)),
                             tuple(rng.uniform(12, 30, size=3)), 4, (30, 30, 30)) for _ in range(int(rng.integers(4, 9)))]
        self.bowel_hu = [float(rng.choice([-850.0, 15.0, 5.0])) for _ in self.bowel]
        self.spine_curve = (rng.uniform(4, 10), rng.uniform(120, 200), rng.uniform(0, 2 * np.pi))
        self.disc_phase = rng.uniform(0, 32)
        self.texture = SmoothField(rng, 3, 9.0, wavelength=25.0, components=10)
        # drawn last so that a seed's organs stay where they were before the viscera had fat
        self.mesentery = SmoothField(rng, 3, 1.0, wavelength=45.0, components=8)
        self.hu = {"liver": rng.uniform(50, 70), "spleen": rng.uniform(40, 55), "kidney": rng.uniform(140, 190),
                   "medulla": rng.uniform(25, 45), "bone": rng.uniform(220, 320), "cortex": rng.uniform(600, 900)}

    def evaluate(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patient coordinates (..., 3) -> (HU float32, labels uint8)."""
        q = ((p - self.offset) @ self.pose) / self.scale  # anatomical frame
        hu = np.full(q.shape[:-1], AIR, dtype=np.float32)
        labels = np.zeros(q.shape[:-1], dtype=np.uint8)
        body_r2 = self.body.radius2(q)
        body = body_r2 < 1
        hu[body] = FAT  # subcutaneous fat
        hu[body_r2 < 0.80] = SOFT  # abdominal wall muscle
        # visceral fat interleaved with soft tissue (mesentery, vessels, muscle): organs border fat
        # in places and soft tissue in others, as in a real abdomen, not a uniform 35 HU filler
        viscera = body_r2 < 0.66
        hu[viscera & (self.mesentery(q)[..., 0] < VISCERAL_FAT_LEVEL)] = FAT
        for shape, value in zip(self.bowel, self.bowel_hu):
            hu[(shape.radius2(q) < 1) & (body_r2 < 0.75)] = value
        liver = (self.liver.radius2(q) < 1) & (body_r2 < 0.85)
        hu[liver], labels[liver] = self.hu["liver"], 1
        spleen = (self.spleen.radius2(q) < 1) & (body_r2 < 0.9)
        hu[spleen], labels[spleen] = self.hu["spleen"], 2
        for shape, value in ((self.kidney_r, 3), (self.kidney_l, 4)):
            r2 = shape.radius2(q)
            kidney = r2 < 1
            hu[kidney], labels[kidney] = self.hu["kidney"], value
            hu[r2 < 0.35] = self.hu["medulla"]
        spine, cortex = self._spine(q)
        hu[spine] = self.hu["bone"]
        hu[spine & cortex] = self.hu["cortex"]
        labels[spine] = 5
        inside = hu > AIR
        hu[inside] += self.texture(q)[..., 0][inside]
        return hu, labels

    def _spine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amp, period, phase = self.spine_curve
        x, y, z = q[..., 0], q[..., 1], q[..., 2]
        yc = 62 + amp * np.sin(z / period * 2 * np.pi + phase)
        body_r2 = (x / 21) ** 2 + ((y - yc) / 17) ** 2
        disc = ((z + self.disc_phase) % 32) < 6
        canal = x**2 + (y - yc - 27) ** 2 < 9**2
        arch_r2 = (x / 27) ** 2 + ((y - yc - 33) / 13) ** 2
        spine = ((body_r2 < 1) & ~disc) | ((arch_r2 < 1) & ~canal)
        cortex = (body_r2 > 0.7) | (arch_r2 > 0.55)
        return spine, cortex


def _acquisition(rng: np.random.Generator, opts: CTOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Row/column directions, slice positions, pixel spacing and slice spacing."""
    fov = opts.fov_mm or rng.uniform(340, 420)
    spacing = fov / opts.matrix
    ss = opts.slice_spacing or float(np.round(rng.uniform(0.6, 5.0), 2))
    extent = opts.z_extent_mm or rng.uniform(180, 280)
    n = max(int(round(extent / ss)), 1)
    row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    if opts.oblique_deg:
        r = rotation(rng, (opts.oblique_deg,) * 3)
        row_dir, col_dir = r @ row_dir, r @ col_dir
    step = np.cross(row_dir, col_dir) * ss
    if opts.tilt_deg:
        t = np.radians(opts.tilt_deg)
        col_dir = np.array([0, np.cos(t), -np.sin(t)])  # the image plane tilts; the table still moves along z
        step = np.array([0, 0, ss])
    center = np.array([0, 0, -20.0]) + rng.uniform(-10, 10, size=3)
    k = np.arange(n) - (n - 1) / 2
    half = (opts.matrix - 1) / 2 * spacing
    positions = center + k[:, None] * step - half * row_dir - half * col_dir
    if opts.reversed_order:
        positions = positions[::-1]
    return np.concatenate([row_dir, col_dir]), positions, np.array([spacing, spacing]), spacing, ss


def generate_ct(seed: int, options: CTOptions | None = None, patient_id: str | None = None) -> CTPhantom:
    """One CT series and its label map, deterministic by seed."""
    opts = options or CTOptions()
    rng = np.random.default_rng(seed)
    anatomy = _Anatomy(rng)
    orientation, positions, pixel_spacing, spacing, ss = _acquisition(rng, opts)
    noise = opts.noise_hu or rng.uniform(8, 25)
    study_uid, series_uid, frame_uid = (deterministic_uid(rng) for _ in range(3))
    sop_uids = [deterministic_uid(rng) for _ in range(len(positions))]
    row_dir, col_dir = orientation[:3].astype(np.float32), orientation[3:].astype(np.float32)
    grid = np.arange(opts.matrix, dtype=np.float32) * spacing
    plane = grid[None, :, None] * row_dir + grid[:, None, None] * col_dir  # [row, col, 3]
    normal = np.cross(orientation[:3], orientation[3:])
    datasets, labels, hus = [], [], []
    for i, ipp in enumerate(positions):
        hu, lab = anatomy.evaluate(plane + ipp.astype(np.float32))
        hu += np.random.default_rng([seed, i]).normal(0, noise, size=hu.shape).astype(np.float32)
        hu_i = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
        ds = base_dataset(CTImageStorage, sop_uids[i], "CT", study_uid=study_uid, series_uid=series_uid,
                          patient_name=f"Phantom^CT{seed}", patient_id=patient_id or f"PHANTOM-CT-{seed}",
                          series_number=1, instance_number=i + 1,
                          series_description="Synthetic abdomen phantom (segnode)")
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
        ds.PixelSpacing = [round(float(spacing), 6)] * 2
        ds.SliceThickness = round(float(ss), 4)
        ds.SliceLocation = round(float(np.dot(ipp, normal)), 4)
        ds.GantryDetectorTilt = float(opts.tilt_deg)
        ds.PatientPosition, ds.BodyPartExamined = "FFS", "ABDOMEN"
        ds.KVP, ds.AcquisitionNumber, ds.ConvolutionKernel = 120, 1, "STANDARD"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        set_pixels(ds, (hu_i.astype(np.int32) + 1024).astype(np.uint16), bits_stored=12)
        datasets.append(ds)
        labels.append(lab)
        hus.append(hu_i)
    return CTPhantom(seed=seed, options=opts, datasets=datasets, labels=np.stack(labels), hu=np.stack(hus),
                     positions=positions, orientation=orientation, pixel_spacing=(float(spacing), float(spacing)))


def write_phantom(phantom: CTPhantom, out: Path) -> list[Path]:
    """Write the series (ct00001.dcm ...) and labels.npz (labels, positions, orientation, spacing, names)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in phantom.datasets:
        path = out / f"ct{int(ds.InstanceNumber):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    np.savez_compressed(out / "labels.npz", labels=phantom.labels, positions=phantom.positions,
                        orientation=phantom.orientation, pixel_spacing=np.array(phantom.pixel_spacing),
                        names=np.array([f"{k}:{v}" for k, v in phantom.label_names.items()]))
    (out / "phantom.json").write_text(json.dumps({"generator": "ct", "seed": phantom.seed,
                                                  "options": dataclasses.asdict(phantom.options)}) + "\n")
    return paths
