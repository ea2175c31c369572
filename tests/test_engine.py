"""The inference engine: label maps land on the source voxels in every geometry, the sliding window
matches MONAI's, options (mirroring, largest component, 2D models, host accumulation) do what they say,
and `segnode infer` writes a NIfTI in the series' geometry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from segnode.imaging.nifti import read_labels
from segnode.imaging.volume import read_series
from segnode.inference.engine import Engine, EngineOptions, largest_components, window_starts
from segnode.models.manifest import Manifest
from segnode.nets import build_network
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.phantom.dicom import set_pixels


class OneHot(nn.Module):
    """A model-free 'network': the input holds label values, class c scores -(x - c)^2."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.register_buffer("values", torch.arange(classes, dtype=torch.float32))
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return -((x - self.values.view(shape)) ** 2)


def _manifest(spatial_dims: int, spacing: list[float], patch: list[int], classes: int = 6) -> Manifest:
    code = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
    return Manifest.model_validate({
        "name": "identity", "version": "0", "modality": "CT", "spatial_dims": spatial_dims,
        "network": {"architecture": "unet", "args": {}}, "target_spacing": spacing, "patch_size": patch,
        "normalization": {"method": "ct", "clip": [0, 255], "mean": 0, "std": 1},
        "labels": [{"value": v, "name": f"l{v}", "category": code, "type": code, "color": [v, v, v]}
                   for v in range(1, classes)], "mirror_axes": list(range(spatial_dims)),
        "weights_sha256": "0" * 64})


def _label_series(tmp_path: Path, only: int | None = None, **options) -> tuple[list[Path], np.ndarray]:
    """A CT phantom whose pixel values are its ground-truth labels (instance order); with `only`, a
    0/1 mask of that label (interpolating between label values would invent labels in between)."""
    phantom = generate_ct(21, CTOptions(matrix=48, slice_spacing=4.0, z_extent_mm=120.0, **options))
    truth = phantom.labels if only is None else (phantom.labels == only).astype(np.uint8)
    for ds, labels in zip(phantom.datasets, truth):
        set_pixels(ds, labels, bits_stored=8)
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    return write_phantom(phantom, tmp_path / ("ct" if only is None else f"ct-{only}")), truth


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * ((a == 1) & (b == 1)).sum() / ((a == 1).sum() + (b == 1).sum()))


GEOMETRIES = {"axial": {}, "reversed": {"reversed_order": True}, "oblique": {"oblique_deg": 20.0},
              "tilt": {"tilt_deg": 15.0}}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_label_map_lands_on_the_source_voxels(tmp_path, geometry):
    files, truth = _label_series(tmp_path, **GEOMETRIES[geometry])
    vol = read_series(files)
    truth = truth[[f for f, _ in vol.order]]  # the volume is in position order, the truth in instance order
    same = Engine(_manifest(3, list(vol.spacing), [16, 24, 24]), OneHot(6)).segment(vol).labels
    if geometry != "tilt":  # the model grid is the source grid: nothing may move
        np.testing.assert_array_equal(same, truth)
    # through an orthogonal grid (tilt) or at half the resolution: interpolated, still on the right voxels
    files, liver = _label_series(tmp_path, only=1, **GEOMETRIES[geometry])
    vol = read_series(files)
    liver = liver[[f for f, _ in vol.order]]
    same = Engine(_manifest(3, list(vol.spacing), [16, 24, 24], classes=2), OneHot(2)).segment(vol).labels
    coarse = Engine(_manifest(3, [s * 2 for s in vol.spacing], [16, 24, 24], classes=2), OneHot(2)).segment(vol).labels
    assert _dice(same, liver) > (0.98 if geometry == "tilt" else 0.9999)
    assert _dice(coarse, liver) > 0.95


def test_sliding_window_matches_monai(tmp_path):
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    manifest = _manifest(3, [1, 1, 1], [16, 24, 16], classes=4)
    net = build_network("dynunet", 3, 1, 4, {"kernel_size": [3, 3, 3], "strides": [1, 2, 2],
                                            "upsample_kernel_size": [2, 2], "filters": [8, 16, 32]}).eval()
    engine = Engine(manifest, net, EngineOptions(device="cpu", batch_size=3))
    for shape in [(40, 44, 37), (12, 20, 30)]:  # uneven tiling; smaller than a window along two axes
        x = torch.randn(1, 1, *shape)
        with torch.inference_mode():
            ours = engine.logits(x)
            theirs = sliding_window_inference(x, manifest.patch_size, 4, net, overlap=0.5, mode="gaussian")[0]
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) < 1e-4 * float(theirs.abs().max())


def test_window_starts_cover_the_axis_and_end_flush():
    assert window_starts(100, 32, 0.5) == [0, 16, 32, 48, 64, 68]
    assert window_starts(20, 32, 0.5) == [0]


def test_mirroring_batches_every_flip_with_the_windows(tmp_path):
    files, truth = _label_series(tmp_path)
    vol = read_series(files)
    net = OneHot(6)
    options = EngineOptions(device="cpu", mirror=True, batch_size=2)
    engine = Engine(_manifest(3, list(vol.spacing), [16, 24, 24]), net, options)
    labels = engine.segment(vol).labels
    np.testing.assert_array_equal(labels, truth[[f for f, _ in vol.order]])  # a flip-equivariant net: unchanged
    # every window with its 7 mirror images in the same forward pass, as many as fill the CPU's batch
    assert all(n % 8 == 0 for n in net.calls) and max(net.calls) == 8 * (engine._cpu_samples() // 8)


def test_host_accumulation_gives_the_same_logits():
    torch.manual_seed(1)
    manifest = _manifest(3, [1, 1, 1], [16, 16, 16], classes=3)
    net = build_network("unet", 3, 1, 3, {"channels": [4, 8], "strides": [2]}).eval()
    x = torch.randn(1, 1, 30, 20, 24)
    with torch.inference_mode():
        a = Engine(manifest, net, EngineOptions(device="cpu")).logits(x)
        b = Engine(manifest, net, EngineOptions(device="cpu", host_accumulation=True)).logits(x)
    torch.testing.assert_close(a, b)


def test_2d_model_runs_slice_by_slice_on_a_3d_series(tmp_path):
    files, truth = _label_series(tmp_path, oblique_deg=10.0)
    vol = read_series(files)
    labels = Engine(_manifest(2, list(vol.spacing[1:]), [32, 32]), OneHot(6)).segment(vol).labels
    np.testing.assert_array_equal(labels, truth[[f for f, _ in vol.order]])


def test_largest_component_drops_islands():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[1:5, 1:5, 1:5] = 1
    labels[8, 8, 8] = 1  # an island
    labels[7:9, 1:3, 1:3] = 2
    out = largest_components(labels)
    assert out[8, 8, 8] == 0 and (out[1:5, 1:5, 1:5] == 1).all() and (out[7:9, 1:3, 1:3] == 2).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_half_precision_gives_the_labels_of_fp32_on_the_cpu(precision, tmp_path):
    """The shipped model on a phantom: half precision on the GPU changes (almost) no voxel's label.
    (A random-weight network is no judge here: its class scores tie within fp16's rounding.)"""
    from segnode.inference.engine import engine_for

    from segnode.config import default_models_dir

    folder = default_models_dir() / "ct-abdomen-phantom-3d"
    phantom = generate_ct(200_003, CTOptions(matrix=96, slice_spacing=3.0, z_extent_mm=180.0))
    vol = read_series(write_phantom(phantom, tmp_path / "ct"))
    cpu = engine_for(folder, EngineOptions(device="cpu")).segment(vol).labels
    gpu = engine_for(folder, EngineOptions(device="cuda", precision=precision)).segment(vol).labels
    assert (cpu > 0).sum() > 1000
    assert (cpu == gpu).mean() > 0.999


def test_segnode_infer_writes_a_nifti_in_the_series_geometry(tmp_path):
    phantom = generate_ct(200_001, CTOptions(matrix=64, slice_spacing=5.0, z_extent_mm=160.0, reversed_order=True))
    write_phantom(phantom, tmp_path / "ct")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "segnode", "infer", "--model", "ct-abdomen-phantom-3d",
                             str(tmp_path / "ct"), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert all(stage in result.stdout for stage in ("read", "preprocess", "windows", "resample", "postprocess"))
    labels, affine = read_labels(out / "labels.nii.gz")
    vol = read_series(sorted((tmp_path / "ct").glob("ct*.dcm")))
    np.testing.assert_allclose(affine, vol.affine, atol=1e-4)  # voxel -> patient exactly as the series
    image = nib.load(out / "labels.nii.gz")  # as any NIfTI reader sees it: i = column, j = row, k = slice
    assert image.shape == (64, 64, len(vol.order))
    np.testing.assert_allclose(image.affine @ [3, 5, 7, 1], np.diag([-1, -1, 1, 1]) @ vol.affine @ [7, 5, 3, 1],
                               atol=1e-3)
    truth = phantom.labels[[f for f, _ in vol.order]]
    assert _dice(labels == 1, truth == 1) > 0.85
    record = json.loads((out / "segmentation.json").read_text())
    assert record["model"]["name"] == "ct-abdomen-phantom-3d" and len(record["model"]["weights_sha256"]) == 64
    assert record["series_instance_uid"] == phantom.datasets[0].SeriesInstanceUID

    tilted = tmp_path / "tilted"
    write_phantom(generate_ct(5, CTOptions(matrix=32, slice_spacing=5.0, z_extent_mm=60.0, tilt_deg=12.0)), tilted)
    refused = subprocess.run([sys.executable, "-m", "segnode", "infer", "--model", "ct-abdomen-phantom-3d", str(tilted),
                              "--out", str(tmp_path / "o2"), "--tilt", "refuse"], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "gantry tilt of 12.0 degrees" in refused.stderr
    assert not (tmp_path / "o2" / "labels.nii.gz").exists()
