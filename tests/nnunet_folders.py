"""Real nnU-Net v2 trained-model folders, made with nnU-Net's own tools (nnunetv2 is a test/bench extra).

`python tests/nnunet_folders.py OUT` writes segnode CT phantoms as an nnU-Net raw dataset, runs
`nnUNetv2_plan_and_preprocess`, trains a 2d and a 3d_fullres model with nnU-Net's trainer (its short
`nnUNetTrainer_1epoch`, iterations per epoch cut further so that CI on two cores can afford it), and saves
randomly initialised 3d_fullres networks in nnU-Net's checkpoint format for three folds, plus a
region-based one. It prints one JSON object naming the folders. nnU-Net reads its folders from the
environment at import time, so every step runs in a child process.

The trainer lookup of nnunetv2's command line imports every trainer module, some of which need timm and
torchvision (not installed: their wheels pull a CUDA torch); the trainers are therefore imported directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

DATASET_ID, DATASET = 501, "Dataset501_Phantom"
MATRIX, FOV_MM, SLICE_MM, Z_EXTENT_MM = 32, 380.0, 6.0, 200.0  # 32x32 pixels of 11.9 mm, 6 mm slices: transposed
TRAINED_ITERATIONS = {"2d": 60, "3d_fullres": 12}
RANDOM_FOLDS = ("0", "1", "2")
REGIONS = {"background": 0, "organs": [1, 2, 3, 4], "kidneys": [3, 4]}  # nested regions, painted in this order


def phantom_case(seed: int, slice_mm: float = SLICE_MM, matrix: int = MATRIX) -> Any:
    """A small CT phantom (segnode.phantom.ct) of the kind the dataset holds."""
    from segnode.phantom.ct import CTOptions, generate_ct

    return generate_ct(seed, CTOptions(matrix=matrix, fov_mm=FOV_MM, slice_spacing=slice_mm, z_extent_mm=Z_EXTENT_MM,
                                       noise_hu=10.0))


def write_raw_dataset(raw: Path, seeds: range) -> Path:
    """imagesTr/labelsTr as NIfTI via SimpleITK (the reader nnU-Net picks), arrays as the phantom stores them
    (slices, rows, cols) = orientation SPL, and dataset.json."""
    import SimpleITK as sitk

    from segnode.phantom.ct import LABELS

    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        p = phantom_case(seed)
        ss = float(np.linalg.norm(p.positions[1] - p.positions[0]))
        for array, path in ((p.hu.astype(np.int16), folder / "imagesTr" / f"ph_{seed:03d}_0000.nii.gz"),
                            (p.labels.astype(np.uint8), folder / "labelsTr" / f"ph_{seed:03d}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((p.pixel_spacing[1], p.pixel_spacing[0], ss))
            image.SetOrigin(tuple(float(v) for v in p.positions[0]))
            sitk.WriteImage(image, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, **{v: k for k, v in LABELS.items()}},
        "numTraining": len(seeds), "file_ending": ".nii.gz", "name": "segnode CT phantoms"}, indent=1))
    return folder


def _child(env: dict[str, str], *args: str, timeout: float = 900) -> None:
    subprocess.run([sys.executable, __file__, *args], env=env, check=True, timeout=timeout)


def build(out: Path) -> dict[str, str]:
    """Every folder the tests and the benchmark use; see the module docstring."""
    env = {**os.environ, "nnUNet_raw": str(out / "raw"), "nnUNet_preprocessed": str(out / "preprocessed"),
           "nnUNet_results": str(out / "results")}
    write_raw_dataset(out / "raw", range(6))
    beside = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"  # the command of this interpreter's nnunetv2
    command = str(beside) if beside.exists() else "nnUNetv2_plan_and_preprocess"
    subprocess.run([command, "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "1"],
                   env=env, check=True, timeout=900, stdout=subprocess.DEVNULL)
    folders = {}
    for configuration, iterations in TRAINED_ITERATIONS.items():
        _child({**env, "nnUNet_n_proc_DA": "0"}, "--train", configuration, str(iterations))  # augment in-process
        folders[f"trained_{configuration}"] = str(out / "results" / DATASET /
                                                  f"nnUNetTrainer_1epoch__nnUNetPlans__{configuration}")
    # the trainer writes its logs under nnUNet_results: a scratch one, so the trained models' folders stay alone
    scratch = {**env, "nnUNet_results": str(out / "scratch"), "SEGNODE_NNUNET_OUT": str(out / "untrained")}
    _child(scratch, "--random", "3d_fullres", "random", *RANDOM_FOLDS)
    folders["random_3d_fullres"] = str(out / "untrained" / "random" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    _child(scratch, "--random", "3d_fullres", "regions", "0")
    folders["regions_3d_fullres"] = str(out / "untrained" / "regions" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    return folders


def _plans_and_dataset() -> tuple[dict[str, Any], dict[str, Any]]:
    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnunetv2.run.run_training sets it before building a trainer
    return plans, json.loads((pre / "dataset.json").read_text())


def _train(configuration: str, iterations: int) -> None:
    import torch
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import nnUNetTrainer_1epoch

    torch.manual_seed(0)
    plans, dataset = _plans_and_dataset()
    trainer = nnUNetTrainer_1epoch(plans, configuration, 0, dataset, device=torch.device("cpu"))
    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = iterations, 2
    trainer.run_training()


def _random(configuration: str, name: str, folds: list[str]) -> None:
    """Randomly initialised networks saved by nnU-Net's trainer (its initialisation, its checkpoint format),
    in a results folder of their own; `regions` makes the dataset region-based."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans, dataset = _plans_and_dataset()
    if name == "regions":
        dataset = {**dataset, "labels": REGIONS, "regions_class_order": [1, 2]}
    results = Path(os.environ["SEGNODE_NNUNET_OUT"]) / name / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    for fold in folds:
        torch.manual_seed(100 + int(fold))
        trainer = nnUNetTrainer(dict(plans), configuration, int(fold), dataset, device=torch.device("cpu"))
        trainer.initialize()
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the mirroring axes it saves
        (results / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(results / f"fold_{fold}" / "checkpoint_final.pth"))
    plans.pop("continue_training")
    (results / "plans.json").write_text(json.dumps(plans, indent=1))
    (results / "dataset.json").write_text(json.dumps(dataset, indent=1))


def reference_predictor(folder: Path, folds: list[str], mirroring: bool = True) -> Any:
    """nnU-Net's own nnUNetPredictor (its defaults: step 0.5, Gaussian, mirroring) for a results folder.

    Its folder initialisation looks the trainer class up by importing every trainer module; ours build
    nnU-Net's default network, so the lookup is answered with nnUNetTrainer.
    """
    import torch
    import nnunetv2.inference.predict_from_raw_data as predict
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    predict.recursive_find_trainer_class_by_name = lambda name: nnUNetTrainer  # type: ignore[attr-defined]
    predictor = predict.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                        device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=tuple(folds),
                                                   checkpoint_name="checkpoint_final.pth")
    return predictor


def reference_labels(predictor: Any, array: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's labels for one array (its axis order, spacing in mm per axis) and each voxel's lead: the
    winning probability minus the runner-up's (softmax; sigmoid margin from 0.5 for region models)."""
    labels, probabilities = predictor.predict_single_npy_array(array[None].astype(np.float32),
                                                               {"spacing": list(spacing)}, None, None, True)
    p = np.asarray(probabilities, dtype=np.float32)
    if predictor.label_manager.has_regions:
        lead = np.abs(p - 0.5).min(axis=0)
    else:
        top = np.sort(p, axis=0)
        lead = top[-1] - top[-2]
    return np.asarray(labels), lead


if __name__ == "__main__":
    if sys.argv[1] == "--train":
        _train(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "--random":
        _random(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        print(json.dumps(build(Path(sys.argv[1]))))
