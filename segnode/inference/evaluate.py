"""Score a model on a labelled image through the production path (the engine), at the image's own
resolution: what bench/eval_models.py and the shipped-model tests report."""

from __future__ import annotations

import time

import numpy as np
import torch

from segnode.imaging.orientation import direction, patient_orientation_of
from segnode.imaging.volume import Volume
from segnode.inference.engine import Engine, EngineOptions
from segnode.models.manifest import Manifest, check_codes
from segnode.training.metrics import label_metrics


def array_volume(image: np.ndarray, spacing: tuple[float, ...], orientation: str | None = None) -> Volume:
    """An axis-aligned volume from a bare array, as if read from DICOM.

    Args:
        image: (slices, rows, cols), or (rows, cols) for one image, in rescaled units (HU for CT).
        spacing: mm per array axis, same order and length as image's axes.
        orientation: the array's axis codes (segnode.imaging.orientation), e.g. a training case's: 3
            letters for a volume, 2 for a radiograph. None: a volume's axes along L, P, S.

    Returns:
        float32 (slices, rows, cols) volume (origin 0) and a 2D image as one slice 1 mm deep: a
        projection image with the matching Patient Orientation when `orientation` is given.
    """
    if image.ndim == 2:
        image, spacing = image[None], (1.0, *spacing)
    array = np.asarray(image, dtype=np.float32)
    scale = tuple(float(s) for s in spacing)
    order = [(i, 0) for i in range(array.shape[0])]
    if orientation is not None and len(orientation) == 2:  # a radiograph: named by Patient Orientation
        return Volume(array, scale, np.diag([*scale, 1.0]), order, projection=True,  # type: ignore[arg-type]
                      patient_orientation=patient_orientation_of(check_codes(orientation, 2)))
    affine = np.diag([*scale, 1.0])
    if orientation is not None:
        for axis, code in enumerate(check_codes(orientation, 3)):
            affine[:3, axis] = direction(code) * scale[axis]
    return Volume(array, scale, affine, order)  # type: ignore[arg-type]


def evaluate_case(net: torch.nn.Module, manifest: Manifest, image: np.ndarray, labels: np.ndarray,
                  spacing: tuple[float, ...], options: EngineOptions | None = None, orientation: str | None = None,
                  ) -> tuple[dict[int, dict[str, float]], float]:
    """Segment `image` through the engine and score it against `labels`.

    Args:
        net: The network (moved to the options' device).
        manifest: Its manifest.
        image: (slices, rows, cols) or (rows, cols), rescaled units (HU for CT).
        labels: Ground truth, integer, image's shape.
        spacing: mm per array axis.
        options: Engine options; defaults to EngineOptions().
        orientation: the image's axis codes (a training case's `orientation`), see `array_volume`.

    Returns:
        ({label value: {"dice", "iou", "hd95" (mm; NaN where the label is absent from either)}},
        seconds the engine took).
    """
    engine = Engine(manifest, net, options or EngineOptions())
    start = time.perf_counter()
    pred = engine.segment(array_volume(image, spacing, orientation)).labels
    seconds = time.perf_counter() - start
    if image.ndim == 2:
        pred = pred[0]
    return label_metrics(pred, labels, [label.value for label in manifest.labels], spacing), seconds
