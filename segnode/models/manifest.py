"""model.json: everything needed to rebuild a model and use it correctly, validated on load."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from segnode.nets import ARCHITECTURES

ANATOMICAL_STRUCTURE = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Code(_Strict):
    """A coded concept (SNOMED CT by default), as DICOM-SEG and SR need it."""

    value: str
    scheme: str = "SCT"
    meaning: str


class Label(_Strict):
    value: int = Field(ge=1, le=255)
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int] = Field(description="display color, RGB 0-255")

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in v):
            raise ValueError("color components are 0-255")
        return v


class Network(_Strict):
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
    z-score. X-ray: map the image's low/high percentiles to 0/1."""

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


class Manifest(_Strict):
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
    normalization: Normalization
    labels: list[Label]
    mirror_axes: list[int] = Field(default_factory=list, description="array axes the model may be mirrored along "
                                   "(test-time augmentation); never the left-right axis when labels are lateral")
    weights_sha256: str
    training: dict[str, Any] = Field(default_factory=dict, description="how it was trained: command, seed, data")

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
        values = [label.value for label in self.labels]
        if not values or sorted(values) != list(range(1, len(values) + 1)):
            raise ValueError("label values must be 1..K without gaps")
        return self

    @property
    def out_channels(self) -> int:
        return len(self.labels) + 1  # background is channel 0
