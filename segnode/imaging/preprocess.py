"""Intensity normalization and resampling: one torch implementation, run on whatever device the tensor
is on, shared by training (segnode.training.trainer) and inference (segnode.inference.engine) so a
model sees at inference exactly the arithmetic it was trained with.

Resampling follows `interpolate(align_corners=False)` (equivalently scipy's `zoom(grid_mode=True,
mode="nearest")`): voxels are cells, the grids' outer edges coincide, and samples beyond the source's
edge repeat the edge voxel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from segnode.models.manifest import Normalization

Interpolation = Literal["linear", "nearest"]

_SLAB_VOXELS = 1 << 24  # grid_sample works through the output in slabs of at most this many voxels
_QUANTILE_SAMPLES = 1 << 22  # torch.quantile's input limit is 2**24; percentiles come from a subsample
# direction cosines are stored as 16-character decimal strings: an off-diagonal term below this is rounding
# (at most 1e-6 * 1024 = 0.001 voxel across a volume), not a rotation between the grids
_DIAGONAL_ATOL = 1e-6


def normalize(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Map intensities to the network's input range, on x's device.

    Args:
        x: Floating-point image of any shape (CT in HU). Statistics (z-score, percentiles) are taken
            over the whole tensor, so pass one image at a time.
        norm: The model's normalization. "ct": clip to `norm.clip` (HU), then subtract `norm.mean`
            and divide by `norm.std` (training-set statistics). "zscore": the image's own mean and
            population std (floored at 1e-6). "percentile": the image's `norm.percentiles` (in %,
            linear interpolation, from an evenly strided subsample above 2**22 voxels) map to 0 and 1.

    Returns:
        A tensor of x's shape, dtype and device.
    """
    if norm.method == "ct":
        assert norm.clip is not None and norm.mean is not None and norm.std is not None
        return (x.clamp(*norm.clip) - norm.mean) / norm.std
    if norm.method == "zscore":
        return (x - x.mean()) / x.std(unbiased=False).clamp(min=1e-6)
    assert norm.percentiles is not None
    flat = x.reshape(-1)
    if flat.numel() > _QUANTILE_SAMPLES:
        flat = flat[:: math.ceil(flat.numel() / _QUANTILE_SAMPLES)]
    lo, hi = torch.quantile(flat.float(), torch.tensor(norm.percentiles, device=x.device) / 100.0)
    return (x - lo) / (hi - lo).clamp(min=1e-6)


def _is_interpolation(m: np.ndarray, src: Sequence[int], shape: Sequence[int], axes: Sequence[int]) -> bool:
    """Whether the affine, on these axes, is the map interpolate(align_corners=False) applies:
    j -> (j + 0.5) * in/out - 0.5."""
    ratio = np.array([src[a] for a in axes], dtype=float) / np.array([shape[a] for a in axes], dtype=float)
    return bool(np.allclose(m[:3, :3], np.diag(np.diag(m[:3, :3])), atol=_DIAGONAL_ATOL)
                and np.allclose(np.diag(m)[list(axes)], ratio, rtol=1e-6)
                and np.allclose(m[list(axes), 3], 0.5 * ratio - 0.5, atol=1e-6))


def _check_mode(x: torch.Tensor, mode: Interpolation) -> None:
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode {mode!r}: 'linear' or 'nearest'")
    if mode == "linear" and not x.is_floating_point():
        raise TypeError(f"linear resampling needs a floating-point tensor, not {x.dtype}")


def resample(x: torch.Tensor, to_source: np.ndarray, shape: Sequence[int],
             mode: Interpolation = "linear") -> torch.Tensor:
    """Sample x at the points of another grid, edges repeated.

    A pure scale between the grids (the usual case) is one `F.interpolate`; any other affine (a
    gantry-tilted stack) goes through `resample_slabs`.

    Args:
        x: [B, C, D, H, W] on any device; floating point for "linear", any dtype for "nearest".
        to_source: 4x4 affine from the output grid's voxel index (d, h, w, 1) to x's voxel index.
        shape: The output's spatial shape (D', H', W').
        mode: "linear" (trilinear; images, logits) or "nearest" (label maps: no invented values).

    Returns:
        [B, C, D', H', W'] in x's dtype, on x's device; x itself when the grids are the same.

    Raises:
        ValueError: `mode` is neither "linear" nor "nearest".
        TypeError: "linear" on an integer tensor.
    """
    _check_mode(x, mode)
    m = np.asarray(to_source, dtype=float)
    if _is_interpolation(m, x.shape[2:], shape, (0, 1, 2)):
        if tuple(shape) == tuple(x.shape[2:]):
            return x
        size = tuple(int(s) for s in shape)
        if mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest-exact")
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    out = torch.empty((x.shape[0], x.shape[1], *shape), dtype=x.dtype, device=x.device)
    for start, slab in resample_slabs(x, m, shape, mode):
        out[:, :, start:start + slab.shape[2]] = slab
    return out


def resample_slabs(x: torch.Tensor, to_source: np.ndarray, shape: Sequence[int],
                   mode: Interpolation = "linear") -> Iterator[tuple[int, torch.Tensor]]:
    """`resample`, a slab of output slices at a time, so the caller can reduce each slab (e.g. argmax
    over classes) without ever holding the full-size result.

    A diagonal map is done separably (along the slices by hand, in-plane with interpolate); any other
    affine (a tilted stack) with grid_sample on generated coordinates.

    Args:
        x: [B, C, D, H, W] on any device; floating point for "linear", any dtype for "nearest".
        to_source: 4x4 affine from the output grid's voxel index to x's voxel index.
        shape: The output's spatial shape (D', H', W').
        mode: "linear" or "nearest", as in `resample`.

    Yields:
        (first output slice, [B, C, n, H', W'] in x's dtype on x's device), in slice order; n is
        chosen so that C * n * H' * W' stays at or under 2**24 voxels (at least one slice).

    Raises:
        ValueError: `mode` is neither "linear" nor "nearest".
        TypeError: "linear" on an integer tensor.
    """
    _check_mode(x, mode)
    m = np.asarray(to_source, dtype=float)
    plane = int(shape[1]) * int(shape[2])
    step = max(1, _SLAB_VOXELS // max(1, plane * x.shape[1]))
    if _is_interpolation(m, x.shape[2:], shape, (1, 2)) and m[0, 0] > 0:
        depth = x.shape[2]
        z = (torch.arange(int(shape[0]), dtype=torch.float64) * m[0, 0] + m[0, 3]).clamp(0, depth - 1)
        nearest = mode == "nearest"
        if nearest:
            i0 = (z + 0.5).floor().long().clamp(max=depth - 1)  # round half up, as interpolate's nearest-exact
        else:
            i0 = z.floor().long()
            i1 = (i0 + 1).clamp(max=depth - 1)
            w = (z - i0).to(x.device)
        for start in range(0, int(shape[0]), step):
            a = i0[start:start + step]
            if nearest:
                blended = x[:, :, a]
            else:
                b = i1[start:start + step]
                ws = w[start:start + step].to(x.dtype)[None, None, :, None, None]
                # blend along the slices on the coarse grid first, then upsample in-plane: the same linear
                # map, but the full-size planes are made once (2.4x faster than upsampling, then blending)
                blended = x[:, :, a] * (1 - ws) + x[:, :, b] * ws  # [B, C, n, H, W]
            if tuple(blended.shape[3:]) != (int(shape[1]), int(shape[2])):
                size = (int(shape[1]), int(shape[2]))
                flat = blended.transpose(1, 2).flatten(0, 1)
                planes = (F.interpolate(flat, size=size, mode="nearest-exact") if nearest else
                          F.interpolate(flat, size=size, mode="bilinear", align_corners=False))  # [B*n, C, H', W']
                blended = planes.unflatten(0, (x.shape[0], len(a))).transpose(1, 2)
            yield start, blended
        return
    dev = x.device
    src = torch.tensor(x.shape[2:], dtype=torch.float64)
    # index -> normalized coordinate (align_corners=True): -1 at index 0, +1 at index n-1
    norm = torch.eye(4, dtype=torch.float64)
    norm[:3, :3] = torch.diag(torch.where(src > 1, 2.0 / (src - 1).clamp(min=1), torch.zeros_like(src)))
    norm[:3, 3] = torch.where(src > 1, -1.0, 0.0)
    full = (norm @ torch.from_numpy(m)).float().to(dev)  # output index -> normalized input coordinate
    j1 = torch.arange(int(shape[1]), device=dev, dtype=torch.float32)
    j2 = torch.arange(int(shape[2]), device=dev, dtype=torch.float32)
    source = x if x.dtype == torch.float32 else x.float()  # coordinates need fp32; so does grid_sample
    sample = "nearest" if mode == "nearest" else "bilinear"
    for start in range(0, int(shape[0]), step):
        j0 = torch.arange(start, min(start + step, int(shape[0])), device=dev, dtype=torch.float32)
        coords = (full[:3, 0] * j0[:, None, None, None] + full[:3, 1] * j1[None, :, None, None]
                  + full[:3, 2] * j2[None, None, :, None] + full[:3, 3])
        grid = coords.flip(-1)[None].expand(x.shape[0], -1, -1, -1, -1)  # grid_sample wants (W, H, D) order
        yield start, F.grid_sample(source, grid, mode=sample, padding_mode="border",
                                   align_corners=True).to(x.dtype)


def spacing_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The array shape at the target spacing: round(n * spacing / target) per axis (Python's round,
    as scipy's zoom computes it, so shapes are those training always used).

    Args:
        shape: Array shape, (slices, rows, cols) or (rows, cols).
        spacing: The array's voxel spacing in mm, same axis order.
        target: The wanted spacing in mm, same axis order.

    Returns:
        The resampled shape, one int per axis.
    """
    return tuple(round(int(n) * (float(s) / float(t))) for n, s, t in zip(shape, spacing, target))


def resample_to_spacing(x: torch.Tensor, spacing: Sequence[float], target: Sequence[float],
                        mode: Interpolation = "linear") -> torch.Tensor:
    """Resample an image or label map from its spacing to the target spacing, over the same field of
    view (the grids' outer edges coincide), through `resample`.

    Args:
        x: (slices, rows, cols) or (rows, cols), on any device; floating point for "linear", any
            dtype (e.g. uint8 labels) for "nearest".
        spacing: x's voxel spacing in mm, in x's axis order.
        target: The wanted spacing in mm, in x's axis order.
        mode: "linear" for images, "nearest" for label maps.

    Returns:
        x's dtype and device, shape `spacing_shape(x.shape, spacing, target)`; x itself when every
        spacing ratio is within np.allclose of 1.

    Raises:
        ValueError: spacing or target does not have one value per axis of a 2D or 3D x, or `mode`
            is neither "linear" nor "nearest".
        TypeError: "linear" on an integer tensor.
    """
    if x.ndim not in (2, 3) or len(spacing) != x.ndim or len(target) != x.ndim:
        raise ValueError(f"a 2D or 3D array with one spacing per axis: shape {tuple(x.shape)}, "
                         f"spacing {tuple(spacing)}, target {tuple(target)}")
    if np.allclose([s / t for s, t in zip(spacing, target)], 1.0):
        return x
    size = spacing_shape(x.shape, spacing, target)
    lead = (1,) * (3 - x.ndim)  # a 2D image is one slice deep
    source, out = lead + tuple(x.shape), lead + size
    ratio = np.array(source, dtype=float) / np.array(out, dtype=float)
    to_source = np.eye(4)
    to_source[:3, :3] = np.diag(ratio)
    to_source[:3, 3] = 0.5 * ratio - 0.5
    return resample(x.reshape((1, 1) + source), to_source, out, mode).reshape(size)
