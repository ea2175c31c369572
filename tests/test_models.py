"""The U-Net family builds from manifests; model folders are verified before use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from segnode.models.manifest import ANATOMICAL_STRUCTURE, Manifest
from segnode.models.registry import ModelError, build, check_model, load_model, write_model_folder
from segnode.nets import NetworkError, build_network

SMALL_ARGS = {
    "unet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0},
    "basic_unet": {"features": [4, 4, 8, 8, 16, 4]},
    "attention_unet": {"channels": [4, 8, 16], "strides": [2, 2]},
    "unet_plus_plus": {"features": [4, 4, 8, 8, 16, 4]},
    "vnet": {},
    "dynunet": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2],
                "filters": [4, 8, 16]},
}
INPUT = {"unet": 16, "basic_unet": 32, "attention_unet": 16, "unet_plus_plus": 32, "vnet": 16, "dynunet": 16}


def manifest(architecture: str = "unet", dims: int = 3, **override) -> Manifest:
    labels = [{"value": i, "name": name, "category": ANATOMICAL_STRUCTURE,
               "type": {"value": code, "scheme": "SCT", "meaning": name}, "color": [200, 50 * i, 40]}
              for i, (name, code) in enumerate([("liver", "10200004"), ("spleen", "78961009")], start=1)]
    data = {"name": "test-model", "version": "0.0.1", "modality": "CT", "spatial_dims": dims,
            "network": {"architecture": architecture, "args": SMALL_ARGS[architecture]},
            "target_spacing": [2.0] * dims, "patch_size": [INPUT[architecture]] * dims,
            "normalization": {"method": "ct", "clip": [-200, 300], "mean": 50.0, "std": 80.0},
            "labels": labels, "weights_sha256": "0" * 64, **override}
    return Manifest.model_validate(data)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("architecture", list(SMALL_ARGS))
def test_every_architecture_builds_from_a_manifest_and_runs_forward(architecture, dims):
    m = manifest(architecture, dims)
    net = build(m).eval()
    size = [INPUT[architecture]] * dims
    with torch.inference_mode():
        out = net(torch.randn(2, 1, *size))
    assert tuple(out.shape) == (2, m.out_channels, *size)
    assert torch.isfinite(out).all()


def test_unknown_network_argument_is_named():
    with pytest.raises(NetworkError, match="unknown argument.*chanels"):
        build_network("unet", 2, 1, 2, {"chanels": [4, 8], "strides": [2]})


def test_manifest_errors_name_the_field():
    with pytest.raises(ValueError, match="patch_size needs 3 values"):
        manifest(patch_size=[16, 16])
    with pytest.raises(ValueError, match="label values must be 1..K"):
        manifest(labels=[{"value": 2, "name": "x", "category": ANATOMICAL_STRUCTURE,
                          "type": ANATOMICAL_STRUCTURE, "color": [1, 2, 3]}])
    with pytest.raises(ValueError, match="method ct needs clip, mean and std"):
        manifest(normalization={"method": "ct"})
    twins = [{"value": v, "name": n, "category": ANATOMICAL_STRUCTURE, "type": ANATOMICAL_STRUCTURE,
              "color": [185, 102, 83]} for v, n in ((1, "kidney_right"), (2, "kidney_left"))]
    with pytest.raises(ValueError, match="labels need distinct colors"):  # a viewer could not tell them apart
        manifest(labels=twins)
    with pytest.raises(ValueError, match="mirror_axes: distinct array axes, 0 to 2"):
        manifest(mirror_axes=[-1])
    with pytest.raises(ValueError, match="target_spacing: finite millimetres"):
        manifest(target_spacing=[2.0, 0.0, 2.0])


def test_model_folder_round_trip_and_check(tmp_path):
    m = manifest("dynunet", 3)
    net = build(m)
    folder = tmp_path / "test-model"
    written = write_model_folder(folder, m, net, "# test model\n")
    assert written.weights_sha256 != "0" * 64
    loaded_manifest, loaded = load_model(folder)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        assert torch.equal(net.eval()(x), loaded(x))
    assert [c.ok for c in check_model(folder)] == [True, True, True]
    cli = subprocess.run([sys.executable, "-m", "segnode", "models", "check", "test-model", "--models-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "ok   forward" in cli.stdout
    listing = subprocess.run([sys.executable, "-m", "segnode", "models", "list", "--models-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert "test-model" in listing.stdout and "liver, spleen" in listing.stdout


def test_tampered_weights_are_refused(tmp_path):
    folder = tmp_path / "m"
    write_model_folder(folder, manifest(), build(manifest()), "card")
    raw = bytearray((folder / "weights.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (folder / "weights.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="does not match model.json"):
        load_model(folder)
    checks = check_model(folder)
    assert not checks[-1].ok and "does not match" in checks[-1].detail


def test_weights_of_another_network_are_refused(tmp_path):
    folder = tmp_path / "m"
    write_model_folder(folder, manifest(), build(manifest()), "card")
    data = json.loads((folder / "model.json").read_text())
    data["network"]["args"]["channels"] = [8, 16, 32]
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="do not fit the network"):
        load_model(folder)
