"""Reference inference: resample to the model's spacing, normalize, MONAI sliding window,
resample the class probabilities back to the input grid, argmax.

Straightforward and CPU-friendly; it is also the baseline the GPU engine is measured against.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from segnode.imaging.preprocess import normalize, resample
from segnode.models.manifest import Manifest


def _fit(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop or edge-pad the trailing axes to exactly `shape` (zoom can be one voxel off)."""
    out = array[(slice(None),) + tuple(slice(0, s) for s in shape)]
    pad = [(0, 0)] + [(0, s - o) for s, o in zip(shape, out.shape[1:])]
    return np.pad(out, pad, mode="edge") if any(p[1] for p in pad) else out


def segment(net: torch.nn.Module, manifest: Manifest, image: np.ndarray, spacing: tuple[float, ...],
            overlap: float = 0.5, device: str = "cpu") -> np.ndarray:
    """Label map (uint8) in the input's grid."""
    from monai.inferers import sliding_window_inference

    x = normalize(resample(image, spacing, manifest.target_spacing, order=1), manifest.normalization)
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device),
                                          manifest.patch_size, 4, net.to(device), overlap=overlap, mode="gaussian")
        probs = torch.softmax(logits.float(), 1)[0].cpu().numpy()
    factors = [1.0] + [o / c for o, c in zip(image.shape, probs.shape[1:])]
    back = ndimage.zoom(probs, factors, order=1, mode="nearest", grid_mode=True)
    return _fit(back, image.shape).argmax(0).astype(np.uint8)
