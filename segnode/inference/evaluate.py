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
    """An axis-aligned volume from an array ([z, y, x], or [y, x] for one image) and its spacing."""
    if image.ndim == 2:
        image, spacing = image[None], (1.0, *spacing)
    return Volume(np.asarray(image, dtype=np.float32), tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                  np.diag([*map(float, spacing), 1.0]), [(i, 0) for i in range(image.shape[0])])


def evaluate_case(net: torch.nn.Module, manifest: Manifest, image: np.ndarray, labels: np.ndarray,
                  spacing: tuple[float, ...], options: EngineOptions | None = None,
                  ) -> tuple[dict[int, dict[str, float]], float]:
    """Segment `image` and score it against `labels`: ({label value: dice/iou/hd95}, seconds)."""
    engine = Engine(manifest, net, options or EngineOptions())
    start = time.perf_counter()
    pred = engine.segment(array_volume(image, spacing)).labels
    seconds = time.perf_counter() - start
    if image.ndim == 2:
        pred = pred[0]
    return label_metrics(pred, labels, [label.value for label in manifest.labels], spacing), seconds
