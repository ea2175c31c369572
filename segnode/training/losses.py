"""Losses: Dice + cross-entropy (default), focal, and the U-Net paper's boundary-weighted CE."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

LOSSES = ("dice_ce", "focal", "weighted_ce")


def unet_weight_map(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """Ronneberger et al. 2015, eq. 2: w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)).

    w_c balances class frequencies (each present class gets the same total weight); d1 and d2 are
    the distances (in pixels/voxels) from a background element to the nearest and the second
    nearest object, objects being the connected components of the foreground. The border term
    makes the thin gaps between touching objects count.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    wc = np.zeros(labels.shape, dtype=np.float32)
    for c, n in zip(classes, counts):
        wc[labels == c] = labels.size / (len(classes) * n)
    components, count = ndimage.label(labels > 0)
    if count < 2:
        return wc
    distances = np.stack([ndimage.distance_transform_edt(components != i) for i in range(1, count + 1)])
    distances.sort(axis=0)
    border = w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2))
    return (wc + np.where(labels == 0, border, 0)).astype(np.float32)


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy weighted per voxel by the U-Net weight map of the target."""

    def __init__(self, w0: float = 10.0, sigma: float = 5.0) -> None:
        super().__init__()
        self.w0, self.sigma = w0, sigma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [B, C, ...], target [B, 1, ...] of class indices."""
        t = target[:, 0].long()
        maps = np.stack([unet_weight_map(x, self.w0, self.sigma) for x in t.cpu().numpy()])
        weights = torch.from_numpy(maps).to(logits.device)
        ce = F.cross_entropy(logits.float(), t, reduction="none")
        return (weights * ce).sum() / weights.sum()


def make_loss(name: str) -> nn.Module:
    """The training loss by name; targets are class-index maps [B, 1, ...]."""
    from monai.losses import DiceCELoss, DiceFocalLoss

    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "focal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True, gamma=2.0)
    if name == "weighted_ce":
        return WeightedCrossEntropy()
    raise ValueError(f"unknown loss {name!r}; one of {', '.join(LOSSES)}")
