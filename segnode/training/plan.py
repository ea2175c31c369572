"""Dataset fingerprint -> training plan, as nnU-Net configures itself; the plan is a JSON file the
user can read and edit before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from segnode.models.manifest import ANATOMICAL_STRUCTURE, Label, Normalization
from segnode.training.data import Case
from segnode.training.losses import LOSSES

# SNOMED CT codes and display colors for the structures segnode's phantoms contain.
CATALOG: dict[str, tuple[str, str, tuple[int, int, int]]] = {
    "liver": ("10200004", "Liver", (221, 130, 101)),
    "spleen": ("78961009", "Spleen", (157, 108, 162)),
    "kidney_right": ("9846003", "Right kidney", (185, 102, 83)),
    "kidney_left": ("18639004", "Left kidney", (96, 148, 196)),  # not the right kidney's: tell them apart
    "spine": ("421060004", "Vertebral column", (241, 214, 145)),
    "lung_right": ("3341006", "Right lung", (197, 165, 145)),
    "lung_left": ("44029006", "Left lung", (128, 174, 128)),
    "heart": ("80891009", "Heart", (206, 110, 84)),
    "clavicles": ("51299004", "Clavicle", (241, 214, 145)),
}
LATERAL = ("_left", "_right")


def coded_labels(names: list[str]) -> list[Label]:
    labels = []
    for value, name in enumerate(names, start=1):
        if name not in CATALOG:
            raise ValueError(f"no SNOMED code known for label {name!r}; add it to segnode.training.plan.CATALOG")
        code, meaning, color = CATALOG[name]
        labels.append(Label(value=value, name=name, category=ANATOMICAL_STRUCTURE,
                            type={"value": code, "scheme": "SCT", "meaning": meaning}, color=color))
    return labels


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str = "1.0.0"
    modality: str
    spatial_dims: int
    labels: list[str] = Field(description="label names in value order (1..K); the rest is background")
    target_spacing: list[float]
    patch_size: list[int]
    normalization: Normalization
    architecture: str = "dynunet"
    network_args: dict[str, Any]
    loss: str = "dice_ce"
    batch_size: int = 2
    epochs: int = 50
    steps_per_epoch: int = 50
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    foreground_fraction: float = 0.33
    mirror_axes: list[int] = Field(default_factory=list, description="array axes to mirror; none across lateral labels")
    rotate_degrees: float = 15.0
    scale_range: float = 0.15
    elastic: bool = True
    elastic_grid: int = Field(3, ge=2, description="2D: control points per axis (the U-Net paper: 3x3)")
    elastic_magnitude_px: tuple[float, float] = Field(
        (10.0, 10.0), description="2D: range of the displacement sigma in pixels (the U-Net paper: 10)")
    validation_cases: int = 2
    validate_every: int = 5
    seed: int = 0
    fingerprint: dict[str, Any] = Field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Plan":
        return cls.model_validate(json.loads(path.read_text()))


def fingerprint(cases: list[Case]) -> dict[str, Any]:
    spacings = np.array([c.spacing for c in cases])
    shapes = np.array([c.image.shape for c in cases])
    fg = np.concatenate([c.image[c.labels > 0][:: max(1, int((c.labels > 0).sum() // 20000))] for c in cases])
    return {
        "cases": len(cases), "modality": cases[0].modality,
        "median_spacing": np.median(spacings, axis=0).round(4).tolist(),
        "spacing_10th_percentile": np.percentile(spacings, 10, axis=0).round(4).tolist(),
        "median_shape": np.median(shapes, axis=0).astype(int).tolist(),
        "foreground_intensity": {"p00_5": float(np.percentile(fg, 0.5)), "p99_5": float(np.percentile(fg, 99.5)),
                                 "mean": float(fg.mean()), "std": float(fg.std())},
    }


def _target_spacing(fp: dict[str, Any], min_spacing: float | None) -> list[float]:
    """Median spacing; a much coarser axis (anisotropy > 3) takes its 10th percentile (nnU-Net)."""
    median = np.array(fp["median_spacing"], dtype=float)
    if median.max() > 3 * median.min():
        axis = int(median.argmax())
        median[axis] = fp["spacing_10th_percentile"][axis]
    if min_spacing:
        median = np.maximum(median, min_spacing)
    return median.round(3).tolist()


def _topology(patch: list[int], spacing: list[float], max_levels: int = 5) -> tuple[list, list]:
    """Strides per level: pool an axis while it stays >= 8 voxels and not much finer than the others."""
    size, sp = list(patch), list(spacing)
    strides: list[list[int]] = [[1] * len(patch)]
    for _ in range(max_levels - 1):
        step = [2 if (size[a] >= 8 and sp[a] <= 2 * min(sp)) else 1 for a in range(len(patch))]
        if not any(s == 2 for s in step):
            break
        strides.append(step)
        size = [s // k for s, k in zip(size, step)]
        sp = [s * k for s, k in zip(sp, step)]
    kernels = [[3] * len(patch) for _ in strides]
    return strides, kernels


def make_plan(cases: list[Case], name: str, *, budget_voxels: int = 96**3, base_filters: int = 32,
              max_filters: int = 320, min_spacing: float | None = None, loss: str = "dice_ce",
              seed: int = 0) -> Plan:
    """nnU-Net-style self-configuration, scaled by the voxel budget and the filter count."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}")
    fp = fingerprint(cases)
    dims = cases[0].image.ndim
    spacing = _target_spacing(fp, min_spacing)
    shape = [int(round(n * s / t)) for n, s, t in zip(fp["median_shape"], fp["median_spacing"], spacing)]
    patch = [max(8, n) for n in shape]
    while int(np.prod(patch)) > budget_voxels:  # shrink the largest physical extent first
        axis = int(np.argmax([p * s for p, s in zip(patch, spacing)]))
        patch[axis] = max(8, int(patch[axis] * 0.9))
    strides, kernels = _topology(patch, spacing)
    factor = np.prod(np.array(strides), axis=0)
    patch = [max(int(f), (p // int(f)) * int(f)) for p, f in zip(patch, factor)]
    filters = [min(base_filters * 2**i, max_filters) for i in range(len(strides))]
    names = [cases[0].label_names[k] for k in sorted(cases[0].label_names)]
    if cases[0].modality == "CT":
        ints = fp["foreground_intensity"]
        norm = Normalization(method="ct", clip=(ints["p00_5"], ints["p99_5"]), mean=ints["mean"], std=ints["std"])
    elif cases[0].modality in ("DX", "CR", "XA"):
        norm = Normalization(method="percentile", percentiles=(1.0, 99.0))
    else:
        norm = Normalization(method="zscore")
    lateral = any(n.endswith(LATERAL) for n in names)
    mirror = [a for a in range(dims) if not (lateral and a == dims - 1)]  # never swap left and right
    return Plan(name=name, modality=cases[0].modality, spatial_dims=dims, labels=names, target_spacing=spacing,
                patch_size=patch, normalization=norm, loss=loss, seed=seed, mirror_axes=mirror,
                network_args={"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:],
                              "filters": filters, "norm_name": "instance", "res_block": False},
                fingerprint=fp)
