"""Imported nnU-Net v2 models: the folders are real (made by nnU-Net's own planner and trainer,
tests/nnunet_folders.py) and the reference is nnU-Net's own predictor."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from segnode.imaging.orientation import reorient_volume
from segnode.imaging.volume import read_series
from segnode.inference.engine import EngineOptions, engine_for
from segnode.inference import nnunet as nn
from segnode.models.manifest import NnUNetResampling
from segnode.models.registry import check_model, read_manifest
from segnode.outputs.seg import Provenance, build_seg
from segnode.outputs.sr import build_sr, segment_stats
from segnode.phantom.ct import write_phantom
from tests import nnunet_folders as folders_tool
from tests.test_outputs import _dciodvfy_errors

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def nnunet_folders(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("nnunet")
    run = subprocess.run([sys.executable, str(REPO / "tests" / "nnunet_folders.py"), str(out)], capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return {k: Path(v) for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A phantom the models never saw, stored with instance 1 the most superior slice (not as trained)."""
    from segnode.phantom.ct import CTOptions, generate_ct

    folder = tmp_path_factory.mktemp("case")
    phantom = generate_ct(100, CTOptions(matrix=folders_tool.MATRIX, fov_mm=folders_tool.FOV_MM, slice_spacing=4.0,
                                         z_extent_mm=folders_tool.Z_EXTENT_MM, noise_hu=10.0, reversed_order=True))
    files = write_phantom(phantom, folder)
    return files, read_series(files)


def _segnode(*args: str, models: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEGNODE_MODELS": str(models)}
    return subprocess.run([sys.executable, "-m", "segnode", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _import(folder: Path, models: Path, name: str, *extra: str) -> Path:
    run = _segnode("models", "import", "nnunet", str(folder), "--orientation", "SPL", "--name", name, *extra,
                   models=models)
    assert run.returncode == 0, run.stderr
    return models / name


def _compare(model: Path, source: Path, volume, folds: list[str]) -> tuple[float, float, float]:
    """(agreement, agreement where nnU-Net's winner leads by >= 0.01, share of such near-ties), both label
    maps in the model's orientation."""
    ours = engine_for(model, EngineOptions(device="cpu")).segment(volume).labels
    spl, turn = reorient_volume(volume, "SPL")
    ref, lead = folders_tool.reference_labels(folders_tool.reference_predictor(source, folds), spl.array, spl.spacing)
    ours = turn.apply(ours) if not turn.identity else ours
    same, sure = ours == ref, lead >= 0.01
    return float(same.mean()), float(same[sure].mean()), float(1 - sure.mean())


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_a_trained_model_gives_the_labels_nnunet_gives(nnunet_folders, case, tmp_path, configuration):
    source = nnunet_folders[f"trained_{configuration}"]
    model = _import(source, tmp_path, "phantom-" + configuration.replace("_", "-"))
    manifest = read_manifest(model)
    assert manifest.nnunet is not None and manifest.nnunet.transpose_forward == [1, 0, 2]  # 6 mm slices, 11.9 mm pixels
    assert manifest.spatial_dims == (2 if configuration == "2d" else 3) and manifest.nnunet.folds == ["0"]
    assert all(c.ok for c in check_model(model))
    agreement, _, _ = _compare(model, source, case[1], ["0"])
    assert agreement >= 0.999


def test_a_random_fold_ensemble_agrees_wherever_nnunet_is_decided(nnunet_folders, case, tmp_path):
    source = nnunet_folders["random_3d_fullres"]
    model = _import(source, tmp_path, "random-3d")
    manifest = read_manifest(model)
    assert manifest.nnunet is not None and manifest.nnunet.folds == ["0", "1", "2"]
    assert manifest.mirror_axes == [0, 1, 2] and manifest.nnunet.use_mirroring
    _, decided, ties = _compare(model, source, case[1], ["0", "1", "2"])
    assert decided >= 0.999
    assert ties < 0.8  # a random network is nearly uniform, but not everywhere


def test_a_region_based_model_paints_its_regions_in_order(nnunet_folders, case, tmp_path):
    source = nnunet_folders["regions_3d_fullres"]
    model = _import(source, tmp_path, "regions-3d")
    manifest = read_manifest(model)
    assert manifest.nnunet is not None and manifest.nnunet.regions == [[1, 2, 3, 4], [3, 4]]
    # as nnU-Net exports it: value 1 where "organs" but not "kidneys" (painted after it) - named so, not "organs"
    assert [(label.value, label.name) for label in manifest.labels] == [(1, "organs excluding kidneys"), (2, "kidneys")]
    assert manifest.out_channels == 2
    _, decided, _ = _compare(model, source, case[1], ["0"])
    assert decided >= 0.999


def test_plans_written_before_the_architecture_block_build_the_same_network(nnunet_folders, tmp_path):
    source = nnunet_folders["trained_3d_fullres"]
    old = tmp_path / "old" / source.name
    shutil.copytree(source, old)
    plans = json.loads((old / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg.pop("architecture")["arch_kwargs"]
    cfg.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=arch["features_per_stage"][0],
               unet_max_num_features=arch["features_per_stage"][-1], n_conv_per_stage_encoder=arch["n_conv_per_stage"],
               n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"], conv_kernel_sizes=arch["kernel_sizes"],
               pool_op_kernel_sizes=arch["strides"], num_pool_per_axis=[len(arch["strides"]) - 1] * 3)
    (old / "plans.json").write_text(json.dumps(plans))
    from safetensors.torch import load_file

    new, old_model = _import(source, tmp_path / "models", "new-layout"), _import(old, tmp_path / "models", "old-layout")
    assert read_manifest(old_model).network.args["arch_kwargs"] == read_manifest(new).network.args["arch_kwargs"]
    ours, theirs = load_file(old_model / "weights.safetensors"), load_file(new / "weights.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    # the same tensors give the same file, so the same hash (the job key and the audit trail depend on it)
    assert read_manifest(old_model).weights_sha256 == read_manifest(new).weights_sha256
    assert read_manifest(new).weights_sha256 in (new / "MODEL_CARD.md").read_text()


def _broken(source: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken" / source.name
    shutil.copytree(source, folder)
    edit(folder)
    return folder


def _edit_plans(change):
    def edit(folder: Path) -> None:
        plans = json.loads((folder / "plans.json").read_text())
        change(plans)
        (folder / "plans.json").write_text(json.dumps(plans))
    return edit


class _Payload:  # what a hostile checkpoint would carry: code run at unpickling
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def _edit_checkpoint(change):
    def edit(folder: Path) -> None:
        import torch

        for path in folder.glob("fold_*/checkpoint_final.pth"):
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own fixture's file
            change(checkpoint)
            torch.save(checkpoint, path)
    return edit


def _nan_weights(checkpoint: dict) -> None:
    name = next(k for k in checkpoint["network_weights"] if k.endswith("seg_layers.2.weight"))
    checkpoint["network_weights"][name][0] = float("nan")


def _cascade(plans: dict) -> None:
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}


@pytest.mark.parametrize("problem, edit, args, message", [
    ("missing fold", None, ["--folds", "0", "3"], "fold 3 has no checkpoint_final.pth (folds present: 0, 1, 2)"),
    ("name outside the models folder", None, ["--name", "../escape"], "--name '../escape': lowercase letters"),
    ("unknown network", _edit_plans(lambda p: p["configurations"]["3d_fullres"]["architecture"].update(
        network_class_name="evil.module.Net")), [], "network class 'evil.module.Net' is not one segnode builds"),
    ("layer outside the allow-list", _edit_plans(lambda p: p["configurations"]["3d_fullres"]["architecture"][
        "arch_kwargs"].update(nonlin="os.system")), [], "plans name 'os.system' as a layer"),
    ("cascade", _edit_plans(_cascade), [], "is a cascade stage"),
    # a negative axis would have mirrored the class channels: silently wrong labels
    ("mirror axis outside the patch", _edit_checkpoint(lambda c: c.update(inference_allowed_mirroring_axes=(-1,))), [],
     "inference_allowed_mirroring_axes (-1,) are not distinct axes 0..2"),
    ("NaN weights", _edit_checkpoint(_nan_weights), [], "holds NaN or infinite values"),
    ("swapped CT percentiles", _edit_plans(lambda p: p["foreground_intensity_properties_per_channel"]["0"].update(
        percentile_00_5=900.0, percentile_99_5=20.0)), [], "percentile_00_5 <= percentile_99_5"),
    ("transpose not a permutation", _edit_plans(lambda p: p.update(transpose_forward=[0, 0, 1])), [],
     "transpose_forward must permute"),
    ("a configuration of the wrong kind", _edit_plans(lambda p: p["configurations"].update({"3d_fullres": "x"})), [],
     "holds something nnU-Net does not write"),
    ("orientation its reader contradicts", _edit_plans(lambda p: p.update(image_reader_writer="NibabelIOWithReorient")),
     [], "its arrays are SAR"),
    ("two channels", lambda f: (f / "dataset.json").write_text(json.dumps({**json.loads(
        (f / "dataset.json").read_text()), "channel_names": {"0": "T1", "1": "T2"}})), [], "2 input channels"),
])
def test_a_folder_segnode_cannot_run_is_refused_in_one_line(nnunet_folders, tmp_path, problem, edit, args, message):
    source = nnunet_folders["random_3d_fullres"]
    folder = _broken(source, tmp_path, edit) if edit else source
    if problem == "cascade":  # as nnU-Net names a cascade's results folder
        folder = folder.rename(folder.parent / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres")
    run = _segnode("models", "import", "nnunet", str(folder), "--orientation", "SPL", *args, models=tmp_path / "m")
    assert run.returncode == 2, run.stdout
    assert message in run.stderr and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_import_needs_a_models_folder_of_its_own(nnunet_folders, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SEGNODE_MODELS"}
    run = subprocess.run([sys.executable, "-m", "segnode", "models", "import", "nnunet",
                          str(nnunet_folders["trained_2d"]), "--orientation", "SPL"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and "--models-dir" in run.stderr


@pytest.mark.parametrize("content", ["code", "truncated", "no plans"])
def test_a_corrupt_or_hostile_folder_is_refused_and_nothing_runs(nnunet_folders, tmp_path, content):
    _Payload.marker = str(tmp_path / "pwned")

    def spoil(folder: Path) -> None:
        checkpoint = folder / "fold_0" / "checkpoint_final.pth"
        if content == "code":
            with open(checkpoint, "wb") as f:
                pickle.dump({"network_weights": {}, "x": _Payload()}, f)
        elif content == "truncated":
            checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
        else:
            (folder / "plans.json").unlink()

    folder = _broken(nnunet_folders["random_3d_fullres"], tmp_path, spoil)
    run = _segnode("models", "import", "nnunet", str(folder), "--orientation", "SPL", models=tmp_path / "m")
    expected = "holds no nnU-Net trained-model folder" if content == "no plans" else \
        "not a checkpoint segnode can read safely"
    assert run.returncode == 2 and expected in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not Path(_Payload.marker).exists()


def test_an_imported_model_routes_and_its_seg_and_sr_carry_its_codes(nnunet_folders, case, tmp_path):
    model = _import(nnunet_folders["trained_3d_fullres"], tmp_path, "phantom-3d")
    rules = tmp_path / "rules.yaml"
    rules.write_text("mode: first\nrules:\n  - name: phantom\n    match: {attribute: Modality, equals: CT}\n"
                     "    action: {models: [phantom-3d]}\n")
    run = _segnode("rules", "check", "--rules", str(rules), models=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    files, volume = case
    manifest = read_manifest(model)
    labels = engine_for(model, EngineOptions(device="cpu")).segment(volume).labels
    labels[labels == 0] = 4  # every segment present, so every description is exercised
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    prov = Provenance("nnunet-job", manifest)
    seg = build_seg(labels, volume.order, sources, prov)
    left = next(s for s in seg.SegmentSequence if s.SegmentLabel == "kidney_left")
    kind = left.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning) == ("64033007", "Left")
    assert _dciodvfy_errors(seg, tmp_path / "seg.dcm") == []
    stats = segment_stats(labels, volume.array, volume.affine, [1, 2, 3, 4, 5],
                          [label.name for label in manifest.labels], hounsfield=True)
    assert _dciodvfy_errors(build_sr(seg, sources, volume.order, stats, prov), tmp_path / "sr.dcm") == []


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_in_fp16_a_trained_model_still_gives_nnuneys_labels(nnunet_folders, case, tmp_path):
    source = nnunet_folders["trained_3d_fullres"]
    model = _import(source, tmp_path, "phantom-3d-gpu")
    ours = engine_for(model, EngineOptions(device="cuda", precision="fp16")).segment(case[1]).labels
    spl, turn = reorient_volume(case[1], "SPL")
    ref, _ = folders_tool.reference_labels(folders_tool.reference_predictor(source, ["0"]), spl.array, spl.spacing)
    assert float(((turn.apply(ours) if not turn.identity else ours) == ref).mean()) >= 0.999


# -- the steps, against nnU-Net's own functions -------------------------------------------------------
def test_window_layout_and_gaussian_are_nnuneys():
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    for size, patch in [((37, 33, 32), (32, 40, 32)), ((200, 95, 64), (96, 80, 48)), ((128, 128), (64, 64))]:
        steps = compute_steps_for_sliding_window(tuple(max(s, p) for s, p in zip(size, patch)), patch, 0.5)
        assert [nn.window_steps(max(s, p), p, 0.5) for s, p in zip(size, patch)] == steps
    theirs = compute_gaussian((32, 40, 32), sigma_scale=1 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    assert torch.equal(nn.nnunet_gaussian((32, 40, 32)), theirs.float())


@pytest.mark.parametrize("shape, spacing, target, order", [
    ((20, 33, 31), (6.0, 2.0, 2.1), (1.5, 1.5, 1.5), 3),  # anisotropic input: the coarse axis alone, order 0
    ((17, 40, 22), (1.0, 5.0, 1.2), (2.0, 2.0, 2.0), 3),  # the coarse axis in the middle
    ((20, 30, 30), (2.0, 2.0, 2.0), (3.1, 1.3, 2.7), 3),  # isotropic: order 3 everywhere
    ((20, 30, 30), (7.0, 2.0, 2.0), (3.5, 1.0, 1.0), 1),  # the logits' order 1
])
def test_resampling_is_nnuneys(shape, spacing, target, order):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    rng = np.random.default_rng(0)
    data = rng.normal(size=shape).astype(np.float32)
    new = nn.compute_new_shape(shape, spacing, target)
    theirs = resample_data_or_seg_to_shape(data[None], new, spacing, target, is_seg=False, order=order, order_z=0,
                                           force_separate_z=None)[0]
    ours = nn.resample_image(data, new, spacing, target, NnUNetResampling(order=order), 3.0)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
