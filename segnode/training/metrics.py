"""Per-label Dice, IoU and HD95 (mm) between a predicted and a reference label map."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch


def _onehot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return torch.nn.functional.one_hot(t, num_classes).movedim(-1, 0)[None].float()


def label_metrics(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int],
                  spacing: Sequence[float]) -> dict[int, dict[str, float]]:
    """{label: {"dice", "iou", "hd95"}}; HD95 in mm, NaN where a label is absent from either map."""
    from monai.metrics import compute_hausdorff_distance, compute_iou
    from monai.metrics.meandice import compute_dice

    k = max(max(labels), int(pred.max()), int(ref.max())) + 1
    p, r = _onehot(pred, k), _onehot(ref, k)
    with warnings.catch_warnings():  # MONAI warns about its own deprecations and about empty labels (NaN here)
        warnings.simplefilter("ignore")
        dice = compute_dice(p, r, include_background=True, ignore_empty=True)[0]
        iou = compute_iou(p, r, include_background=True, ignore_empty=True)[0]
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=list(spacing))[0]
    out = {}
    for label in labels:
        present = bool(p[0, label].any() and r[0, label].any())
        out[label] = {"dice": float(dice[label]), "iou": float(iou[label]),
                      "hd95": float(hd[label]) if present else float("nan")}
    return out
