"""Training cases from phantom folders (or any folder laid out the same way): DICOM + labels.npz."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segnode.imaging.orientation import reorient_volume
from segnode.imaging.volume import read_image, read_series


@dataclass(kw_only=True)
class Case:
    name: str
    image: np.ndarray  # float32 [z, y, x] or [y, x]
    labels: np.ndarray  # uint8, same shape
    spacing: tuple[float, ...]
    modality: str
    label_names: dict[int, str]
    origin: dict = field(default_factory=dict)  # phantom.json when the case is a generated phantom
    orientation: str | None = None  # axis codes it was brought into (segnode.imaging.orientation)


# Training brings every case into one orientation, which the model records: volumes as axial CT stores
# them; radiographs frontal, rows toward the feet and columns toward the patient's left.
CANONICAL_VOLUME, CANONICAL_PROJECTION = "SPL", "FL"


def load_case(folder: Path) -> Case:
    """A folder with dx.dcm or ct*.dcm (in instance order, as labels.npz) and labels.npz."""
    saved = np.load(folder / "labels.npz")
    names = {int(k): v for k, v in (s.split(":", 1) for s in saved["names"])}
    labels = saved["labels"].astype(np.uint8)
    orientation: str | None
    if (folder / "dx.dcm").exists():
        vol, modality = read_image(folder / "dx.dcm"), "DX"
        orientation = CANONICAL_PROJECTION if vol.patient_orientation else None
        if orientation:
            vol, turn = reorient_volume(vol, orientation)
            labels = turn.apply(labels[None])[0]
        image, spacing = vol.array[0], tuple(vol.spacing[1:])
    else:
        files = sorted(folder.glob("ct*.dcm"))
        if not files:
            raise FileNotFoundError(f"{folder}: no dx.dcm or ct*.dcm")
        vol, modality = read_series(files), "CT"  # slices sorted along the normal, as inference sees them
        labels = labels[[file for file, _ in vol.order]]  # labels.npz follows instance (file) order
        orientation = CANONICAL_VOLUME
        vol, turn = reorient_volume(vol, orientation)  # as the engine will
        labels = np.ascontiguousarray(turn.apply(labels))
        image, spacing = vol.array, vol.spacing
    if labels.shape != image.shape:
        raise ValueError(f"{folder}: labels {labels.shape} do not match the image {image.shape}")
    origin = json.loads((folder / "phantom.json").read_text()) if (folder / "phantom.json").exists() else {}
    return Case(name=folder.name, image=image, labels=labels, spacing=spacing, modality=modality, label_names=names,
                origin=origin, orientation=orientation)


def load_cases(data_dir: Path) -> list[Case]:
    folders = sorted(p.parent for p in data_dir.glob("*/labels.npz"))
    if not folders:
        raise FileNotFoundError(f"no cases (folders with labels.npz) under {data_dir}")
    return [load_case(f) for f in folders]
