"""model.json: everything needed to rebuild a model and use it correctly, validated on load."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from segnode.nets import ARCHITECTURES

MAX_PATCH_VOXELS = 1 << 26  # far above any published model's (nnU-Net's 3D patches: ~2M voxels)
ANATOMICAL_STRUCTURE = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}


# axis code -> (LPS patient axis, sign): where increasing index points (segnode.imaging.orientation)
PATIENT_DIRECTIONS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


def check_codes(codes: str, dims: int) -> str:
    """Axis codes (segnode.imaging.orientation) normalized: upper case, Patient Orientation's H/F as S/I.

    Raises:
        ValueError: not `dims` letters of L, R, A, P, S, I, or two of them on the same patient axis.
    """
    normal = "".join({"H": "S", "F": "I"}.get(c, c) for c in codes.upper())
    if len(normal) != dims or any(c not in PATIENT_DIRECTIONS for c in normal):
        raise ValueError(f"orientation {codes!r}: {dims} letters of L, R, A, P, S (or H), I (or F)")
    if len({PATIENT_DIRECTIONS[c][0] for c in normal}) != dims:
        raise ValueError(f"orientation {codes!r}: each letter must name a different patient axis")
    return normal


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Code(_Strict):
    """A coded concept (SNOMED CT by default), as DICOM-SEG and SR need it."""

    value: str
    scheme: str = "SCT"
    meaning: str


class Label(_Strict):
    """One output class: value k is channel k of the logits and segment k of the SEG.

    Attributes:
        value: 1-255 (0 is background); a manifest's values are 1..K without gaps.
        name: Short name (segment label, SR tracking identifier).
        category: Segmented property category (usually Anatomical Structure).
        type: Segmented property type, a SNOMED CT code.
        modifier: Segmented property type modifier, e.g. laterality (SCT 7771000 Left) where the type
            code itself has none (TotalSegmentator's codes: Kidney + Left).
        color: Display colour, RGB 0-255 (SEG, contour images).
    """

    value: int = Field(ge=1, le=255)
    name: str
    category: Code
    type: Code
    modifier: Code | None = None
    color: tuple[int, int, int] = Field(description="display color, RGB 0-255")

    @field_validator("name")
    @classmethod
    def _segment_label(cls, v: str) -> str:
        if not v or len(v) > 64 or "\\" in v or not v.isprintable():
            raise ValueError("1-64 printable characters without backslash (it is the SEG's Segment Label, VR LO)")
        return v

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in v):
            raise ValueError("color components are 0-255")
        return v


class Network(_Strict):
    """The network to build: one of segnode.nets.ARCHITECTURES and its constructor's arguments
    (without spatial_dims, in_channels, out_channels, which come from the manifest)."""

    architecture: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: str) -> str:
        if v not in ARCHITECTURES:
            raise ValueError(f"one of {', '.join(ARCHITECTURES)}")
        return v


class Normalization(_Strict):
    """CT: clip to a HU window, then z-score with the training set's statistics. MR: per-image
    z-score. X-ray: map the image's low/high percentiles to 0/1 (segnode.imaging.preprocess.normalize).

    Attributes:
        method: "ct", "zscore" or "percentile".
        clip: ct: (low, high) in HU.
        mean: ct: mean HU of the training set's foreground (labelled voxels).
        std: ct: their standard deviation in HU, > 0.
        percentiles: percentile: (low, high) in percent, e.g. (1, 99).

    Raises:
        pydantic.ValidationError: ct without clip, mean and std, or percentile without percentiles.
    """

    method: Literal["ct", "zscore", "percentile"]
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = Field(None, gt=0)
    percentiles: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _complete(self) -> "Normalization":
        if self.method == "ct" and (self.clip is None or self.mean is None or self.std is None):
            raise ValueError("method ct needs clip, mean and std")
        if self.method == "percentile" and self.percentiles is None:
            raise ValueError("method percentile needs percentiles")
        return self


class NnUNetNormalization(_Strict):
    """One input channel's normalization as nnU-Net's preprocessor applies it (before resampling).

    Attributes:
        scheme: The class nnU-Net's plans name (default_normalization_schemes.py).
        use_mask_for_norm: ZScore statistics over the non-zero region only (then only it is normalized).
        intensity_properties: CTNormalization's training-set statistics: mean, std, percentile_00_5,
            percentile_99_5 (the plans' foreground_intensity_properties_per_channel).
    """

    scheme: Literal["CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization"]
    use_mask_for_norm: bool = False
    intensity_properties: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _complete(self) -> "NnUNetNormalization":
        p = self.intensity_properties
        if any(not math.isfinite(v) for v in p.values()):
            raise ValueError("intensity_properties must be finite numbers")
        if self.scheme == "CTNormalization":
            missing = {"mean", "std", "percentile_00_5", "percentile_99_5"} - set(p)
            if missing:
                raise ValueError(f"CTNormalization needs intensity_properties {', '.join(sorted(missing))}")
            if p["std"] <= 0 or p["percentile_00_5"] > p["percentile_99_5"]:
                raise ValueError(f"CTNormalization needs std > 0 and percentile_00_5 <= percentile_99_5 "
                                 f"(std {p['std']}, {p['percentile_00_5']} .. {p['percentile_99_5']})")
        return self


class NnUNetResampling(_Strict):
    """nnU-Net's resampling (default_resampling.py): spline `order` in every axis, except that when the
    spacing is anisotropic (largest / smallest > anisotropy_threshold, one axis alone the coarsest) that axis
    is resampled separately with `order_z`."""

    order: int = Field(ge=0, le=3)
    order_z: int = Field(0, ge=0, le=1)
    force_separate_z: bool | None = None


class NnUNet(_Strict):
    """How nnU-Net v2 feeds and reads an imported model (segnode.inference.nnunet), from its plans,
    dataset.json and checkpoints. Array axes here are nnU-Net's: the model's orientation, transposed by
    `transpose_forward`.

    Attributes:
        source: The results folder it was imported from (Dataset/Trainer__Plans__configuration).
        configuration: "2d" or "3d_fullres" (or a configuration inheriting from them).
        folds: The folds whose logits are averaged ("0".."4", "all").
        checkpoint: The checkpoint file the weights came from.
        transpose_forward: Axis order applied before the network; transpose_backward undoes it.
        normalization: One entry per input channel.
        resampling_data: For the image (order 3 by default).
        resampling_probabilities: For the logits, back to the cropped input grid (order 1 by default).
        anisotropy_threshold: nnUNetv2.configuration.ANISO_THRESHOLD.
        tile_step_size: Window step as a fraction of the patch (nnU-Net's default 0.5).
        use_mirroring: Average over mirror images along `Manifest.mirror_axes` (nnU-Net's default).
        regions: Region-based models: the label sets each output channel stands for, in channel order.
        regions_class_order: The label value painted for each region (sigmoid > 0.5), in this order.
    """

    source: str
    configuration: str
    trainer: str
    plans_name: str
    folds: list[str] = Field(min_length=1)
    checkpoint: str = "checkpoint_final.pth"
    transpose_forward: list[int]
    transpose_backward: list[int]
    crop_to_nonzero: bool = True
    normalization: list[NnUNetNormalization] = Field(min_length=1)
    resampling_data: NnUNetResampling
    resampling_probabilities: NnUNetResampling
    anisotropy_threshold: float = 3.0
    tile_step_size: float = Field(0.5, gt=0, le=1)
    use_mirroring: bool = True
    regions: list[list[int]] | None = None
    regions_class_order: list[int] | None = None

    @field_validator("folds")
    @classmethod
    def _folds(cls, v: list[str]) -> list[str]:
        if any(not re.fullmatch(r"[0-9]+|all", f) for f in v) or len(set(v)) != len(v):
            raise ValueError("distinct fold names: digits or 'all'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "NnUNet":
        if sorted(self.transpose_forward) != list(range(3)) or \
                sorted(self.transpose_backward) != list(range(3)) or \
                [self.transpose_forward.index(i) for i in range(3)] != self.transpose_backward:
            raise ValueError("transpose_forward must permute (0, 1, 2) and transpose_backward undo it")
        if (self.regions is None) != (self.regions_class_order is None) or \
                (self.regions is not None and len(self.regions) != len(self.regions_class_order or [])):
            raise ValueError("regions and regions_class_order go together, one entry each")
        return self


class Manifest(_Strict):
    """model.json: what the model is, how to build it and how to feed it. Validated on load, so a
    model that would run on the wrong grid or emit the wrong codes is refused before it runs.

    Attributes:
        name: Folder-safe name (lowercase letters, digits, hyphens).
        modality: The DICOM Modality it segments (CT, DX, ...).
        spatial_dims: 2 or 3.
        target_spacing: mm per array axis: (slice, row, col) for 3D, (row, col) for 2D.
        patch_size: Sliding-window size in voxels, same axes.
        labels: Output classes 1..K; channel 0 is background.
        mirror_axes: Array axes the model may be mirrored along (test-time augmentation).
        weights_sha256: Hash of weights.safetensors, checked before loading.
        training: How it was trained (command, seed, data, validation), free-form.
        nnunet: Present for an imported nnU-Net model: it is then run as nnU-Net runs it
            (segnode.inference.nnunet), and `normalization` is not used.

    Raises:
        pydantic.ValidationError: on construction or model_validate, for an unknown architecture,
            a bad name or hash, spacing or patch size not spatial_dims long, or label values not 1..K.
    """

    format: Literal[1] = 1
    name: str
    version: str
    description: str = ""
    modality: str
    spatial_dims: Literal[2, 3]
    input_channels: int = Field(1, ge=1)
    network: Network
    target_spacing: list[float] = Field(description="mm, array axis order: (z, y, x) or (row, col)")
    patch_size: list[int]
    normalization: Normalization | None = None
    labels: list[Label]
    orientation: str | None = Field(None, description="the patient orientation the model was trained in, as axis "
                                    "codes (segnode.imaging.orientation): 'SPL' for axial CT, 'FL' for a frontal "
                                    "radiograph (rows toward the feet, columns toward the patient's left); every "
                                    "input is brought into it first. None: arrays as stored (not recommended)")
    mirror_axes: list[int] = Field(default_factory=list, description="array axes the model may be mirrored along "
                                   "(test-time augmentation); never the left-right axis when labels are lateral")
    weights_sha256: str
    training: dict[str, Any] = Field(default_factory=dict, description="how it was trained: command, seed, data")
    nnunet: NnUNet | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", v):
            raise ValueError("lowercase letters, digits and hyphens (it is a folder name)")
        return v

    @field_validator("weights_sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("a SHA-256 in lowercase hex")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        for key in ("target_spacing", "patch_size"):
            if len(getattr(self, key)) != self.spatial_dims:
                raise ValueError(f"{key} needs {self.spatial_dims} values (spatial_dims)")
        if not all(math.isfinite(s) and 0 < s < 1e4 for s in self.target_spacing):
            raise ValueError("target_spacing: finite millimetres, > 0")
        if not all(p >= 1 for p in self.patch_size) or math.prod(self.patch_size) > MAX_PATCH_VOXELS:
            raise ValueError(f"patch_size: at least 1 voxel per axis, at most {MAX_PATCH_VOXELS} voxels in all")
        if sorted(set(self.mirror_axes)) != sorted(self.mirror_axes) or \
                any(not 0 <= a < self.spatial_dims for a in self.mirror_axes):
            raise ValueError(f"mirror_axes: distinct array axes, 0 to {self.spatial_dims - 1}")
        if self.normalization is None and self.nnunet is None:
            raise ValueError("normalization is required (only an imported nnU-Net model carries its own)")
        if self.nnunet is not None and len(self.nnunet.normalization) != self.input_channels:
            raise ValueError("nnunet.normalization needs one entry per input channel")
        colours = [tuple(label.color) for label in self.labels]
        if len(set(colours)) != len(colours):
            raise ValueError("labels need distinct colors: a viewer could not tell two segments apart")
        values = [label.value for label in self.labels]
        if not values or sorted(values) != list(range(1, len(values) + 1)):
            raise ValueError("label values must be 1..K without gaps")
        if self.orientation is not None:  # 2D models: a radiograph's plane (2 letters) or a volume's (3)
            check_codes(self.orientation, 3 if self.spatial_dims == 3 or len(self.orientation) == 3 else 2)
        return self

    @property
    def out_channels(self) -> int:
        """Number of logits channels: the labels plus background, or a region-based model's regions."""
        if self.nnunet is not None and self.nnunet.regions is not None:
            return len(self.nnunet.regions)
        return len(self.labels) + 1  # background is channel 0
