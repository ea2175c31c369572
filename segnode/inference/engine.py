"""segnode's inference engine: a volume in its source geometry -> label map in exactly that geometry.

The whole chain stays on one device (the GPU when there is one): resample to the model's grid,
normalize, Gaussian-weighted sliding window with the windows batched (and, optionally, their
mirror images in the same batch), accumulation in fp16 on the GPU, resample the logits back to the
source grid, argmax. Peers spend most of their time outside the network (nnU-Net resamples logits
on the CPU; MONAI accumulates in fp32 and leaves pre/post-processing to the caller).

Geometry: the model grid is an orthogonal grid along the source's own axes (slice normal, column
and row directions) that covers the source's field of view, at (about) the model's spacing. Every
mapping between the two grids is one affine in index space; for an ordinary stack it is a diagonal
scale, done with `interpolate`, and for a gantry-tilted (sheared) stack a full affine, done with
`grid_sample`. The same affine, inverted, brings the logits back, so the label map lands on the
source voxels however the series was acquired.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segnode.flow import Segmentation, Timings
from segnode.metrics import MODEL_LOAD_SECONDS
from segnode.imaging.preprocess import normalize, resample, resample_slabs
from segnode.imaging.orientation import reorient_volume
from segnode.imaging.volume import SeriesError, Volume
from segnode.models.manifest import Manifest

log = logging.getLogger(__name__)

Precision = Literal["fp16", "bf16", "fp32"]
# voxels per forward pass on the CPU (Engine._forward), at most 64 samples: measured on nnU-Net networks, a 3D
# window (32x40x32) alone takes 178 ms, ~108 ms each in twos to sixes, 131 ms in eights (out of cache); a 2D window
# (40x32) 5.7 ms alone, 3.2 ms in fours, 2.5-2.6 ms in 16s to 128s, 3.6 ms in 256s
_CPU_BATCH_VOXELS = 1 << 18


@dataclass(kw_only=True)
class EngineOptions:
    """How an engine runs; the fields are recorded in segmentation.json and part of the warm engine's key."""

    device: str = "auto"  # auto: CUDA when present, else CPU
    overlap: float = 0.5
    batch_size: int = 8  # windows per forward pass
    precision: Precision = "fp16"  # autocast on CUDA; the CPU always computes in fp32
    mirror: bool = False  # test-time augmentation: every flip along the manifest's mirror axes, batched with the windows
    compile: bool = False  # torch.compile the network (first call slower, later calls faster)
    largest_component: bool = False  # keep only the largest connected component of each label
    host_accumulation: bool | None = None  # None: only when the accumulators do not fit on the device

    def torch_device(self) -> torch.device:
        """The device to run on: the first CUDA device for "auto" when there is one, else the CPU.

        Raises:
            RuntimeError: `device` is not a device string torch knows (e.g. "cuda:0", "cpu").
        """
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class Grid:
    """The model grid: its shape and the affine from its index to the source's index."""

    shape: tuple[int, int, int]
    to_source: np.ndarray  # 4x4, model index -> source index


def model_grid(volume: Volume, spacing: Sequence[float]) -> Grid:
    """An orthogonal grid along the source's axes, covering its field of view at about `spacing` mm.

    The extent is the source's voxel edges (not centres), divided into round(extent / spacing)
    voxels (at least 1) per axis, so the actual spacing differs from `spacing` by under half a voxel
    over the extent. For a tilted stack the grid is the bounding box of the sheared volume.

    Args:
        volume: The source, with its LPS affine.
        spacing: Wanted spacing in mm along (slice normal, column direction, row direction), i.e.
            the model's (slice, row, col) axes.

    Returns:
        The grid's (slices, rows, cols) shape and its model index -> source index affine.
    """
    a = volume.affine
    col, row = a[:3, 1] / np.linalg.norm(a[:3, 1]), a[:3, 2] / np.linalg.norm(a[:3, 2])
    normal = np.cross(row, col)
    normal *= np.sign(np.dot(normal, a[:3, 0])) or 1.0
    frame = np.stack([normal, col, row], axis=1)  # columns: the model grid's axis directions
    n = np.array(volume.array.shape, dtype=float)
    corners = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in n])))  # voxel edges, index space
    points = (np.c_[corners, np.ones(len(corners))] @ a.T)[:, :3] @ frame  # in the frame's coordinates
    low, extent = points.min(0), np.ptp(points, axis=0)
    shape = np.maximum(1, np.round(extent / np.asarray(spacing, dtype=float))).astype(int)
    voxel = extent / shape
    model = np.eye(4)
    model[:3, :3] = frame * voxel
    model[:3, 3] = frame @ (low + 0.5 * voxel)
    return Grid((int(shape[0]), int(shape[1]), int(shape[2])), np.linalg.inv(a) @ model)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window origins along one axis, spaced window*(1-overlap) apart, the last flush with the end
    (the scheme of MONAI's sliding_window_inference, so the blend matches it).

    Args:
        size: The axis' length in voxels.
        window: The window's length in voxels.
        overlap: Fraction of a window shared with the next, in [0, 1).

    Returns:
        Sorted, distinct origins; [0] when the axis fits in one window.
    """
    if size <= window:
        return [0]
    interval = max(1, int(window * (1 - overlap)))
    count = math.ceil((size - window) / interval) + 1
    return sorted({min(i * interval, size - window) for i in range(count)})


def gaussian(window: Sequence[int]) -> torch.Tensor:
    """Importance weights: MONAI's Gaussian (sigma = window/8 per axis, peak 1, floor 1e-3), so that a
    window's blend is the same as with sliding_window_inference(mode="gaussian").

    Args:
        window: The window's shape in voxels.

    Returns:
        float32 tensor of that shape, on the CPU.
    """
    from monai.data.utils import compute_importance_map

    return compute_importance_map(tuple(int(w) for w in window), mode="gaussian", sigma_scale=0.125,
                                  device="cpu").float()


class _Slicewise(nn.Module):
    """Runs a 2D network on windows of depth one, so 2D models share the 3D engine."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :, 0])[:, :, None]


class Engine:
    """One model on one device, loaded once and kept warm.

    Args:
        manifest: The model's manifest (spacing, patch size, normalization, labels, mirror axes).
        net: The network, taking [B, input_channels, *patch_size] and returning
            [B, out_channels, *patch_size] logits; moved to the device and put in eval mode. A 2D
            network is run slice by slice on windows one slice deep.
        options: How to run; defaults to EngineOptions().

    Raises:
        RuntimeError: options.device is not a device torch knows.
    """

    def __init__(self, manifest: Manifest, net: nn.Module, options: EngineOptions | None = None) -> None:
        self.manifest = manifest
        self.options = options or EngineOptions()
        self.device = self.options.torch_device()
        net = net.eval().to(self.device)
        if manifest.spatial_dims == 2:
            net = _Slicewise(net)
        if self.options.compile:
            net = torch.compile(net)  # type: ignore[assignment]
        self.net = net
        self.window = tuple(manifest.patch_size) if manifest.spatial_dims == 3 else (1, *manifest.patch_size)
        self.gauss = self.importance(self.window).to(self.device)
        # only along the axes the model allows (a flip across left-right would swap lateral labels)
        first = 2 if manifest.spatial_dims == 3 else 3  # tensor dim of the model's first array axis
        self.mirror_dims = [first + axis for axis in manifest.mirror_axes]
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # -- window layout (an imported nnU-Net model uses nnU-Net's: segnode.inference.nnunet) --------------
    def importance(self, window: Sequence[int]) -> torch.Tensor:
        """Each window's blending weights, float32 of the window's shape on the CPU (MONAI's Gaussian)."""
        return gaussian(window)

    def starts(self, size: int, window: int) -> list[int]:
        """Window origins along one axis of `size` voxels (MONAI's layout, EngineOptions.overlap)."""
        return window_starts(size, window, self.options.overlap)

    def recorded_options(self) -> dict[str, object]:
        """The options as they took effect, for segmentation.json (the CPU computes in fp32 whatever was asked)."""
        options: dict[str, object] = dict(vars(self.options))
        if not self._cuda:
            options["precision"] = "fp32"
        return options

    # -- precision ---------------------------------------------------------------------------------
    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """float16 on CUDA unless precision is fp32 (half the memory for the logits), else float32."""
        return torch.float16 if self._cuda and self.options.precision != "fp32" else torch.float32

    def _autocast(self) -> torch.autocast:
        enabled = self._cuda and self.options.precision != "fp32"
        dtype = torch.bfloat16 if self.options.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

    # -- the chain ---------------------------------------------------------------------------------
    def spacing_for(self, volume: Volume) -> tuple[float, float, float]:
        """The model grid's spacing in mm (slice, row, col); a 2D model keeps the source's slice spacing."""
        t = self.manifest.target_spacing
        return (float(t[0]), float(t[1]), float(t[2])) if len(t) == 3 else (volume.spacing[0], float(t[0]), float(t[1]))

    def segment(self, volume: Volume) -> Segmentation:
        """Segment a volume in its own geometry: resample to the model grid, normalize, sliding window,
        logits back onto the source voxels, argmax.

        Args:
            volume: float32 (slices, rows, cols) with its LPS affine; any orientation or gantry tilt. It
                is first brought into the orientation the model was trained in (its manifest's
                `orientation`), by a permutation and flips of its axes, and the labels back the same way.

        Returns:
            uint8 labels of the volume's shape, on the CPU, with per-stage timings and notes.

        Raises:
            OrientationError: a radiograph without Patient Orientation, or not in the model's view.
            torch.OutOfMemoryError: on CUDA, the volume on the model grid or a batch of windows does
                not fit in device memory (accumulators that do not fit move to the host by themselves,
                see EngineOptions.host_accumulation).
        """
        timings = Timings()
        start = time.perf_counter()
        source_shape = volume.array.shape
        turn = None
        if self.manifest.orientation:
            volume, turn = reorient_volume(volume, self.manifest.orientation)
        self._check_coverage(volume)
        grid = model_grid(volume, self.spacing_for(volume))
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None, None].to(self.device)
            assert self.manifest.normalization is not None  # Manifest validation: only nnU-Net models have none
            x = normalize(resample(x, grid.to_source, grid.shape), self.manifest.normalization)
            logits = self._timed_logits(x, timings, start)
            start = time.perf_counter()
            labels = self.labels_in_source(logits, grid, volume.array.shape)
            timings.resample = time.perf_counter() - start
        start = time.perf_counter()
        if self.options.largest_component:
            labels = largest_components(labels)
        if turn is not None and not turn.identity:
            labels = turn.restore(labels)
            assert labels.shape == source_shape
        timings.postprocess = time.perf_counter() - start
        notes = list(volume.notes)
        if self.options.mirror and not self.mirror_dims:
            notes.append(f"mirroring requested, but {self.manifest.name} allows no mirror axis: not mirrored")
        return Segmentation(labels, timings, notes)

    def _timed_logits(self, x: torch.Tensor, timings: Timings, since: float) -> torch.Tensor:
        """`logits(x)` on the prepared input, recording timings.preprocess (from `since`) and timings.windows."""
        self._sync()
        timings.preprocess = time.perf_counter() - since
        start = time.perf_counter()
        logits = self.logits(x)
        self._sync()
        timings.windows = time.perf_counter() - start
        return logits

    def _check_coverage(self, volume: Volume) -> None:
        """A 3D model sees a patch of the body at once and was trained on whole regions: on a series that
        covers less than a quarter of its patch along an axis (a slice or two of a CT) it finds organs it
        cannot see whole - refused rather than delivered."""
        if self.manifest.spatial_dims != 3 or volume.projection:
            return
        extent = [n * s for n, s in zip(volume.array.shape, volume.spacing)]
        patch = [p * t for p, t in zip(self.manifest.patch_size, self.manifest.target_spacing)]
        short = [i for i in range(3) if extent[i] < patch[i] / 4]
        if short:
            axis = short[0]
            raise SeriesError(f"series {volume.series_uid or '(no Series Instance UID)'}: covers "
                              f"{extent[axis]:.0f} mm along array axis {axis}; {self.manifest.name} looks at "
                              f"{patch[axis]:.0f} mm at once and needs at least a quarter of it "
                              f"({patch[axis] / 4:.0f} mm) to see what it segments")

    def labels_in_source(self, logits: torch.Tensor, grid: Grid, shape: Sequence[int]) -> np.ndarray:
        """Logits on the model grid -> uint8 labels on the source grid: resampled and reduced to
        labels a slab at a time, so no full-size copy of every class's logits is ever made.

        Args:
            logits: [C, D, H, W] on the model grid, any float dtype, on any device.
            grid: The model grid the logits are on.
            shape: The source's (slices, rows, cols).

        Returns:
            uint8 (slices, rows, cols) on the CPU: per voxel the class with the highest trilinearly
            interpolated logit (the first on a tie).
        """
        out = np.empty(tuple(shape), dtype=np.uint8)
        for start, slab in resample_slabs(logits[None], np.linalg.inv(grid.to_source), shape):
            # max().indices, not argmax(): the same first-maximum answer, but on the CPU argmax over the
            # outer (class) dimension is 7.7x slower - 15 of 19 s on a 300x512x512 CT with 2 cores
            labels = slab[0].max(0).indices.to(torch.uint8).cpu().numpy()
            out[start:start + labels.shape[0]] = labels
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian-weighted sliding window over the model grid.

        Args:
            x: [1, input_channels, D, H, W], normalized, on the model grid, on the engine's device.
                An axis shorter than the window is zero-padded symmetrically (as MONAI does).

        Returns:
            [C, D, H, W] logits (C = out_channels), the weighted mean over the windows (and their
            mirror images when asked), in `accumulate_dtype` on the device, or float32 on the host
            when host accumulation is on.
        """
        spatial = tuple(x.shape[2:])
        pad = [max(0, w - s) for w, s in zip(self.window, spatial)]
        if any(pad):  # smaller than a window: pad symmetrically with zeros, as MONAI does
            x = F.pad(x, [p for d in reversed(pad) for p in (d // 2, d - d // 2)])
        padded = tuple(x.shape[2:])
        host = self.options.host_accumulation
        if host is None:
            host = self._cuda and not self._fits(padded)
        acc_device = torch.device("cpu") if host else self.device
        dtype = self.accumulate_dtype if not host else torch.float32
        channels = self.manifest.out_channels
        acc = torch.zeros((channels, *padded), dtype=dtype, device=acc_device)
        weight = torch.zeros(padded, dtype=torch.float32, device=acc_device)
        source = x.to(acc_device) if host else x
        gauss_acc = self.gauss.to(acc_device)
        gauss_w = gauss_acc.to(dtype)
        corners = list(itertools.product(*[self.starts(s, w) for s, w in zip(padded, self.window)]))
        boxes = [tuple(slice(c, c + w) for c, w in zip(corner, self.window)) for corner in corners]
        for box in boxes:
            weight[box] += gauss_acc
        flips = self._flips()
        per_batch = self.options.batch_size
        if not self._cuda:  # enough windows to fill the CPU's best batch with them and their mirror images
            per_batch = max(per_batch, self._cpu_samples() // (1 + len(flips)))
        for i in range(0, len(boxes), per_batch):
            batch = boxes[i:i + per_batch]
            xb = torch.cat([source[(slice(None), slice(None), *b)] for b in batch]).to(self.device, non_blocking=True)
            if flips:
                xb = torch.cat([xb] + [xb.flip(d) for d in flips])
            with self._autocast():
                out = self._forward(xb)
            if flips:
                n = len(batch)
                parts = [out[:n]] + [out[(k + 1) * n:(k + 2) * n].flip(d) for k, d in enumerate(flips)]
                out = torch.stack(parts).mean(0, dtype=torch.float32)
            out = out.to(acc_device, dtype)
            out *= gauss_w
            for k, b in enumerate(batch):
                acc[(slice(None), *b)] += out[k]
        acc /= weight.to(dtype)
        if any(pad):
            acc = acc[(slice(None), *[slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial)])]
        return acc  # on the host when it did not fit the device: labels_in_source then works there too

    def _cpu_samples(self) -> int:
        """Samples per forward pass on the CPU: _CPU_BATCH_VOXELS worth of windows, 1 to 64."""
        return max(1, min(64, _CPU_BATCH_VOXELS // math.prod(self.window)))

    def _forward(self, xb: torch.Tensor) -> torch.Tensor:
        """The network over a batch; on the CPU in parts of `_cpu_samples` (larger batches fall out of cache)."""
        size = self._cpu_samples()
        if self._cuda or xb.shape[0] <= size:
            return self.net(xb)  # type: ignore[no-any-return]
        parts = math.ceil(xb.shape[0] / size)  # even parts: 8 windows in 4 + 4, not 6 + 2
        return torch.cat([self.net(part) for part in xb.tensor_split(parts)])

    def _flips(self) -> list[tuple[int, ...]]:
        """The mirror images batched with each window (every combination of the allowed axes)."""
        if not self.options.mirror:
            return []
        return [dims for r in range(1, 4) for dims in itertools.combinations(self.mirror_dims, r)]

    def warm_up(self) -> float:
        """One full batch of zeros through the network, so the first study does not pay for lazy
        allocation, cuDNN's autotuning or compilation.

        Returns:
            Seconds taken.
        """
        start = time.perf_counter()
        n = self.options.batch_size * (1 + len(self._flips()))
        with torch.inference_mode(), self._autocast():
            self.net(torch.zeros((n, self.manifest.input_channels, *self.window), device=self.device))
        self._sync()
        return time.perf_counter() - start

    def _fits(self, shape: Sequence[int]) -> bool:
        """Whether input, accumulators and the back-resampled logits fit in free device memory."""
        free, _ = torch.cuda.mem_get_info(self.device)
        voxels = math.prod(shape)
        need = voxels * (4 + 4 + 2 * self.manifest.out_channels) * 2
        return need < 0.7 * free


def largest_components(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest 26-connected component of each label (stray islands go to background).

    Args:
        labels: Integer label map, 3D (26-connectivity needs three axes).

    Returns:
        A copy of the same shape and dtype; on a tie in size the component found first stays.
    """
    from scipy import ndimage

    out = labels.copy()
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        parts, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        if count > 1:
            sizes = np.bincount(parts.ravel())[1:]
            out[mask & (parts != int(np.argmax(sizes)) + 1)] = 0
    return out


# -- warm models -----------------------------------------------------------------------------------
_ENGINES: dict[tuple[str, str, str], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def engine_for(folder: Path, options: EngineOptions | None = None) -> Engine:
    """The engine for a model folder and device, loaded on first use and then kept (one per worker).

    Cached by folder, weights hash and options, so new weights in the same folder load afresh.
    Thread-safe: concurrent first calls load the model once.

    Args:
        folder: A model folder (model.json, weights.safetensors).
        options: How to run; defaults to EngineOptions().

    Returns:
        The warm engine.

    Raises:
        ModelError: the folder's manifest or weights are missing, invalid or do not match.
    """
    from segnode.models.registry import load_model, read_manifest

    options = options or EngineOptions()
    manifest = read_manifest(folder)
    key = (str(folder.resolve()), manifest.weights_sha256, f"{options.torch_device()}|{options}")
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            started = time.perf_counter()
            manifest, net = load_model(folder)
            if manifest.nnunet is not None:
                from segnode.inference.nnunet import NnUNetEngine

                engine = _ENGINES[key] = NnUNetEngine(manifest, net, options)
            else:
                engine = _ENGINES[key] = Engine(manifest, net, options)
            MODEL_LOAD_SECONDS.labels(manifest.name).observe(time.perf_counter() - started)
            log.info("loaded model %s %s on %s", manifest.name, manifest.version, engine.device)
        return engine
