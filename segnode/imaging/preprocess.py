"""Intensity normalization and resampling, shared by training and inference so both see the same
input."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from segnode.models.manifest import Normalization


def normalize(image: np.ndarray, norm: Normalization) -> np.ndarray:
    """float32 in, float32 out (the network's dtype), whatever the statistics' dtype."""
    return _normalize(image.astype(np.float32), norm).astype(np.float32, copy=False)


def _normalize(img: np.ndarray, norm: Normalization) -> np.ndarray:
    if norm.method == "ct":
        assert norm.clip is not None and norm.mean is not None and norm.std is not None
        return (np.clip(img, *norm.clip) - norm.mean) / norm.std
    if norm.method == "zscore":
        return (img - img.mean()) / max(float(img.std()), 1e-6)
    assert norm.percentiles is not None
    lo, hi = np.percentile(img, norm.percentiles)
    return (img - lo) / max(float(hi - lo), 1e-6)


def resample(array: np.ndarray, spacing: Sequence[float], target: Sequence[float], order: int) -> np.ndarray:
    """To the target spacing (order 1 for images, 0 for label maps)."""
    factors = [s / t for s, t in zip(spacing, target)]
    if np.allclose(factors, 1.0):
        return array
    return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
