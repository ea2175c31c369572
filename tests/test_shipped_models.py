"""The models segnode ships: valid folders, and they segment held-out phantoms on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from segnode.inference.evaluate import evaluate_case
from segnode.config import default_models_dir
from segnode.models.registry import load_model
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.phantom.dx import DXOptions, generate_dx, write_dx
from segnode.training.data import load_case

SHIPPED = ["ct-abdomen-phantom-3d", "dx-chest-phantom-2d"]
HELD_OUT = 200_000  # never a training seed


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_passes_its_check(name):
    result = subprocess.run([sys.executable, "-m", "segnode", "models", "check", name], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    card = (default_models_dir() / name / "MODEL_CARD.md").read_text()
    assert "synthetic" in card.lower() and "segnode train" in card


def _dice(name, folder):
    manifest, net = load_model(default_models_dir() / name)
    case = load_case(folder)
    metrics, _ = evaluate_case(net, manifest, case.image, case.labels, case.spacing, orientation=case.orientation)
    return {label.name: metrics[label.value]["dice"] for label in manifest.labels}


def test_shipped_3d_model_segments_a_held_out_phantom(tmp_path):
    write_phantom(generate_ct(HELD_OUT, CTOptions(matrix=96, slice_spacing=4.0)), tmp_path / "ct")
    dice = _dice("ct-abdomen-phantom-3d", tmp_path / "ct")
    assert min(dice.values()) >= 0.85, dice


def test_shipped_2d_model_segments_a_held_out_phantom(tmp_path):
    write_dx(generate_dx(HELD_OUT, DXOptions(matrix=256)), tmp_path / "dx")
    dice = _dice("dx-chest-phantom-2d", tmp_path / "dx")
    assert min(dice.values()) >= 0.85, dice
