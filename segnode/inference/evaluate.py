"""Score a model on a labelled image through the production path (the engine), at the image's own
resolution: what bench/eval_models.py and the shipped-model tests report."""

from __future__ import annotations

import time

import numpy as np
import torch

from segnode.imaging.volume import Volume
from segnode.inference.engine import Engine, EngineOptions
from segnode.models.manifest import Manifest
from segnode.training.metrics import label_metrics


def array_volume(image: np.ndarray, spacing: tuple[float, ...]) -> Volume:
    """An axis-aligned volume from a bare array, as if read from DICOM.

    Args:
        image: (slices, rows, cols), or (rows, cols) for one image, in rescaled units (HU for CT).
        spacing: mm per array axis, same order and length as image's axes.

    Returns:
        float32 (slices, rows, cols) volume with a diagonal affine (origin 0, axes along LPS) and
        a 2D image as one slice 1 mm deep.
    """
    if image.ndim == 2:
        image, spacing = image[None], (1.0, *spacing)
    return Volume(np.asarray(image, dtype=np.float32), tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                  np.diag([*map(float, spacing), 1.0]), [(i, 0) for i in range(image.shape[0])])


def evaluate_case(net: torch.nn.Module, manifest: Manifest, image: np.ndarray, labels: np.ndarray,
                  spacing: tuple[float, ...], options: EngineOptions | None = None,
                  ) -> tuple[dict[int, dict[str, float]], float]:
    """Segment `image` through the engine and score it against `labels`.

    Args:
        net: The network (moved to the options' device).
        manifest: Its manifest.
        image: (slices, rows, cols) or (rows, cols), rescaled units (HU for CT).
        labels: Ground truth, integer, image's shape.
        spacing: mm per array axis.
        options: Engine options; defaults to EngineOptions().

    Returns:
        ({label value: {"dice", "iou", "hd95" (mm; NaN where the label is absent from either)}},
        seconds the engine took).
    """
    engine = Engine(manifest, net, options or EngineOptions())
    start = time.perf_counter()
    pred = engine.segment(array_volume(image, spacing)).labels
    seconds = time.perf_counter() - start
    if image.ndim == 2:
        pred = pred[0]
    return label_metrics(pred, labels, [label.value for label in manifest.labels], spacing), seconds
