"""nnU-Net v2's inference, reproduced for imported models (segnode.models.nnunet_import).

Step for step as nnunetv2 2.x does it (default_preprocessor.py, cropping.py,
default_normalization_schemes.py, default_resampling.py, sliding_window_prediction.py,
predict_from_raw_data.py, export_prediction.py), on arrays in the model's orientation:

1. transpose_forward; crop to the bounding box of the non-zero voxels (holes filled);
2. normalize (numpy, float32, exactly nnU-Net's arithmetic), then resample to the configuration's
   spacing with skimage's `resize` semantics (scipy spline of order 3, edge mode, clipped to the input's
   range; the coarse axis separately with order 0 when the spacing is anisotropic);
3. sliding window with nnU-Net's window layout and Gaussian, zero padding to the patch, mirroring over
   the allowed axes, folds averaged (FoldEnsemble);
4. logits resampled to the cropped grid (linear; order 0 along an anisotropic axis), argmax or region
   sigmoid > 0.5 in regions_class_order, pasted into the uncropped grid, transpose_backward.

Where it differs, it is faster, not different: windows and their mirror images go through the network in
batches; fold logits are averaged per window instead of per image (the steps between are linear); the
logits are resampled and reduced to labels a slab at a time on the engine's device (nnU-Net resamples every
class on the CPU in float64), and accumulate in float32 (nnU-Net: float16).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from segnode.flow import Segmentation, Timings
from segnode.imaging.orientation import reorient_volume
from segnode.imaging.volume import Volume
from segnode.inference.engine import Engine
from segnode.models.manifest import NnUNet, NnUNetNormalization, NnUNetResampling

_SLAB_VOXELS = 1 << 24  # logits are resampled and reduced a slab of at most this many voxels x channels at a time


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """default_resampling.compute_new_shape: round(old spacing / new spacing * old size) per axis."""
    return tuple(int(round(i / j * k)) for i, j, k in zip(spacing, target, shape))


def separate_axis(force: bool | None, current: Sequence[float], new: Sequence[float],
                  threshold: float) -> int | None:
    """default_resampling.determine_do_sep_z_and_axis: the axis resampled on its own, or None.

    The anisotropic axis is the one coarsest axis of the current spacing when it is anisotropic (largest /
    smallest > threshold), else of the new one; none when two or three axes share the largest spacing.
    """
    def lowres(spacing: Sequence[float]) -> list[int]:
        s = np.asarray(spacing, dtype=float)
        return [int(a) for a in np.where(max(s) / s == 1)[0]]

    def anisotropic(spacing: Sequence[float]) -> bool:
        return bool(np.max(spacing) / np.min(spacing) > threshold)

    if force is not None:
        axes = lowres(current) if force else []
    elif anisotropic(current):
        axes = lowres(current)
    elif anisotropic(new):
        axes = lowres(new)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


def crop_to_nonzero(data: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """cropping.crop_to_nonzero: the bounding box of the non-zero voxels with holes filled, and that mask.

    Returns:
        (slices of the box; the whole array when nothing is non-zero, the filled mask inside the box).
    """
    mask = ndimage.binary_fill_holes(data != 0)
    box = []
    for axis in range(data.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(data.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, data.shape[axis]))
    return tuple(box), mask[tuple(box)]


def normalize(image: np.ndarray, mask: np.ndarray, scheme: NnUNetNormalization) -> np.ndarray:
    """default_normalization_schemes, the same numpy float32 operations.

    Args:
        image: float32, modified in place.
        mask: The filled non-zero mask (ZScore with use_mask_for_norm).
        scheme: The channel's normalization from the manifest.

    Returns:
        The normalized image (float32).
    """
    eps = 1e-8
    if scheme.scheme == "CTNormalization":
        p = scheme.intensity_properties
        np.clip(image, p["percentile_00_5"], p["percentile_99_5"], out=image)
        image -= p["mean"]
        image /= max(p["std"], eps)
    elif scheme.scheme == "ZScoreNormalization":
        if scheme.use_mask_for_norm:
            mean, std = image[mask].mean(), image[mask].std()
            image[mask] = (image[mask] - mean) / max(std, eps)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
    elif scheme.scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
    return image


def _resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """skimage.transform.resize(image, shape, order, mode="edge", anti_aliasing=False) on float64, as
    nnU-Net calls it: scipy's zoom with grid_mode, clipped to the input's range."""
    factors = np.divide(image.shape, shape)
    out = ndimage.zoom(image, [1 / f for f in factors], order=order, mode="nearest", cval=0, grid_mode=True)
    np.clip(out, np.min(image), np.max(image), out=out)
    return out


def _axis_positions(n_in: int, n_out: int) -> np.ndarray:
    """Where output index k samples the input along one axis: (k + 0.5) * n_in / n_out - 0.5."""
    return (n_in / n_out) * (np.arange(n_out) + 0.5) - 0.5


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """The input index scipy's order-0 map_coordinates (mode nearest) picks for each output index."""
    return ndimage.map_coordinates(np.arange(n_in, dtype=float), [_axis_positions(n_in, n_out)], order=0,
                                   mode="nearest").astype(np.int64)


def resample_image(data: np.ndarray, shape: Sequence[int], spacing: Sequence[float], target: Sequence[float],
                   rule: NnUNetResampling, threshold: float) -> np.ndarray:
    """default_resampling.resample_data_or_seg_to_shape for one image channel.

    Args:
        data: float32 (D, H, W), nnU-Net's axis order.
        shape: The output shape.
        spacing: data's spacing in mm, same order; target: the output's.
        rule: Orders and force_separate_z.
        threshold: Anisotropy threshold.

    Returns:
        float32 of `shape`; `data` itself when the shape does not change.
    """
    if tuple(data.shape) == tuple(shape):
        return data
    image = data.astype(float)
    axis = separate_axis(rule.force_separate_z, spacing, target, threshold)
    if axis is None:
        return _resize(image, shape, rule.order).astype(data.dtype)
    plane = [s for a, s in enumerate(shape) if a != axis]
    moved = np.moveaxis(image, axis, 0)
    stack = np.stack([_resize(moved[k], plane, rule.order) for k in range(moved.shape[0])])
    if stack.shape[0] != shape[axis]:
        n_in, n_out = stack.shape[0], int(shape[axis])
        if rule.order_z == 0:
            stack = stack[_nearest_indices(n_in, n_out)]
        else:
            pos = np.clip(_axis_positions(n_in, n_out), 0, n_in - 1)
            low = np.floor(pos).astype(np.int64)
            high = np.minimum(low + 1, n_in - 1)
            w = (pos - low)[:, None, None]
            stack = stack[low] * (1 - w) + stack[high] * w
    return np.moveaxis(stack, 0, axis).astype(data.dtype)


def nnunet_gaussian(patch: Sequence[int]) -> torch.Tensor:
    """sliding_window_prediction.compute_gaussian(sigma_scale=1/8, value_scaling_factor=10) in float16, zeros
    replaced by the smallest weight, returned as float32 on the CPU."""
    tmp = np.zeros(tuple(int(p) for p in patch))
    tmp[tuple(int(p) // 2 for p in patch)] = 1
    g = ndimage.gaussian_filter(tmp, [p / 8 for p in patch], 0, mode="constant", cval=0)
    g /= np.max(g) / 10
    half = torch.from_numpy(g).to(torch.float16)
    half[half == 0] = torch.min(half[half != 0])
    return half.float()


def window_steps(size: int, window: int, step: float) -> list[int]:
    """sliding_window_prediction.compute_steps_for_sliding_window, one axis: ceil((size - window) /
    (window * step)) + 1 windows spread evenly, rounded."""
    n = int(np.ceil((size - window) / (window * step))) + 1
    if n <= 1:
        return [0]
    actual = (size - window) / (n - 1)
    return [int(np.round(actual * i)) for i in range(n)]


class NnUNetEngine(Engine):
    """An imported nnU-Net model on one device, run as nnU-Net runs it (module docstring).

    Args:
        manifest: A manifest with its `nnunet` block.
        net: The fold ensemble (segnode.nets.nnunet.FoldEnsemble), [B, 1, *patch] -> [B, heads, *patch].
        options: Device, batch size, precision (overlap and mirror are nnU-Net's, from the manifest).

    Raises:
        ValueError: the manifest has no nnunet block.
    """

    def __init__(self, manifest, net, options=None) -> None:  # type: ignore[no-untyped-def]
        if manifest.nnunet is None:
            raise ValueError(f"{manifest.name} is not an imported nnU-Net model")
        self.nn: NnUNet = manifest.nnunet
        super().__init__(manifest, net, options)

    def importance(self, window: Sequence[int]) -> torch.Tensor:
        """nnU-Net's Gaussian over the patch (a 2D model's windows are one slice deep)."""
        return nnunet_gaussian(self.manifest.patch_size).reshape(tuple(window))

    def starts(self, size: int, window: int) -> list[int]:
        """nnU-Net's window origins; every slice for a 2D model's depth axis."""
        if window == 1:
            return list(range(size))
        return window_steps(size, window, self.nn.tile_step_size)

    def _flips(self) -> list[tuple[int, ...]]:
        """Every non-empty combination of the allowed mirror axes, when the model allows mirroring."""
        if not self.nn.use_mirroring:
            return []
        dims = self.mirror_dims
        return [c for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)]

    def recorded_options(self) -> dict[str, object]:
        """The model's own window step and mirroring, not the options' overlap and mirror (which do not apply)."""
        options = super().recorded_options()
        options.update(overlap=None, tile_step_size=self.nn.tile_step_size, mirror=bool(self._flips()),
                       mirror_axes=self.manifest.mirror_axes if self._flips() else [], folds=self.nn.folds)
        return options

    def segment(self, volume: Volume) -> Segmentation:
        """Segment a volume as nnU-Net would segment its array in the model's orientation.

        Args:
            volume: float32 (slices, rows, cols) with its affine; brought into the manifest's orientation
                first, and the labels back.

        Returns:
            uint8 labels of the volume's shape, timings, notes.

        Raises:
            OrientationError: a radiograph, or a volume without a usable orientation.
        """
        timings = Timings()
        start = time.perf_counter()
        source_shape = volume.array.shape
        turn = None
        if self.manifest.orientation:
            volume, turn = reorient_volume(volume, self.manifest.orientation)
        tf = self.nn.transpose_forward
        data = np.ascontiguousarray(volume.array.astype(np.float32).transpose(tf))
        spacing = [float(volume.spacing[i]) for i in tf]
        before = data.shape
        if self.nn.crop_to_nonzero:
            box, mask = crop_to_nonzero(data)
            data = np.ascontiguousarray(data[box])
        else:
            box, mask = tuple(slice(0, n) for n in data.shape), np.ones(data.shape, dtype=bool)
        cropped = data.shape
        t = [float(s) for s in self.manifest.target_spacing]
        target = t if len(t) == 3 else [spacing[0], *t]
        shape = compute_new_shape(cropped, spacing, target)
        data = normalize(data, mask, self.nn.normalization[0])
        data = resample_image(data, shape, spacing, target, self.nn.resampling_data, self.nn.anisotropy_threshold)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None].to(self.device)
            logits = self._timed_logits(x, timings, start)
            start = time.perf_counter()
            labels = self.export(logits, cropped, target, spacing)
            timings.resample = time.perf_counter() - start
        start = time.perf_counter()
        full = np.zeros(before, dtype=np.uint8)
        full[box] = labels
        out = np.ascontiguousarray(full.transpose(self.nn.transpose_backward))
        if turn is not None and not turn.identity:
            out = turn.restore(out)
        assert out.shape == source_shape
        timings.postprocess = time.perf_counter() - start
        mirrored = f"mirroring along axes {self.manifest.mirror_axes}" if self._flips() else "no mirroring"
        notes = [*volume.notes, f"run as nnU-Net runs {self.nn.source}: folds {', '.join(self.nn.folds)}, window step "
                                f"{self.nn.tile_step_size}, {mirrored} (the model's settings; overlap and mirror "
                                f"options do not apply)"]
        return Segmentation(out, timings, notes)

    def export(self, logits: torch.Tensor, shape: Sequence[int], current: Sequence[float],
               new: Sequence[float]) -> np.ndarray:
        """export_prediction: logits resampled to `shape` and reduced to labels, a slab at a time.

        Args:
            logits: [C, D, H, W] on the model's grid (any device, any float dtype).
            shape: The cropped input's shape.
            current: The model grid's spacing; new: the input's (nnU-Net's axis order).

        Returns:
            uint8 labels of `shape` on the CPU.
        """
        rule = self.nn.resampling_probabilities
        axis = separate_axis(rule.force_separate_z, current, new, self.nn.anisotropy_threshold)
        lead = axis if axis is not None else 0
        perm = [lead] + [a for a in range(3) if a != lead]
        source = logits.permute(0, *[p + 1 for p in perm])
        out_shape = [int(shape[p]) for p in perm]
        n_in, n_out = source.shape[1], out_shape[0]
        nearest = axis is not None and rule.order_z == 0
        if nearest:
            low = torch.from_numpy(_nearest_indices(n_in, n_out))
        else:
            pos = torch.from_numpy(np.clip(_axis_positions(n_in, n_out), 0, n_in - 1))
            low = pos.floor().long()
            high = (low + 1).clamp(max=n_in - 1)
            weight = (pos - low).float()
        plane = out_shape[1] * out_shape[2]
        step = max(1, _SLAB_VOXELS // max(1, plane * source.shape[0]))
        out = np.empty(out_shape, dtype=np.uint8)
        for first in range(0, n_out, step):
            idx = slice(first, min(first + step, n_out))
            if nearest or n_in == n_out:
                slab = source[:, low[idx].to(source.device)].float() if n_in != n_out else source[:, idx].float()
            else:
                w = weight[idx].to(source.device)[None, :, None, None]
                slab = source[:, low[idx].to(source.device)].float() * (1 - w) + \
                    source[:, high[idx].to(source.device)].float() * w
            if tuple(slab.shape[2:]) != tuple(out_shape[1:]):
                slab = F.interpolate(slab.transpose(0, 1), size=tuple(out_shape[1:]), mode="bilinear",
                                     align_corners=False).transpose(0, 1)
            out[idx] = self._labels(slab).cpu().numpy()
        return np.ascontiguousarray(np.transpose(out, np.argsort(perm)))

    def _labels(self, logits: torch.Tensor) -> torch.Tensor:
        """[C, n, H, W] logits -> uint8 labels: argmax (the first maximum), or for a region-based model the
        label of the last region in regions_class_order whose sigmoid exceeds 0.5."""
        if self.nn.regions_class_order is None:
            return logits.max(0).indices.to(torch.uint8)
        labels = torch.zeros(logits.shape[1:], dtype=torch.uint8, device=logits.device)
        for channel, value in enumerate(self.nn.regions_class_order):
            labels[torch.sigmoid(logits[channel]) > 0.5] = value
        return labels
