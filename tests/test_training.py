"""Planning and training on tiny phantoms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segnode.models.registry import check_model, load_model
from segnode.phantom.ct import CTOptions, generate_ct, write_phantom
from segnode.phantom.dx import DXOptions, generate_dx, write_dx
from segnode.training.data import load_cases
from segnode.training.plan import Plan, make_plan
from segnode.training.trainer import train


@pytest.fixture(scope="module")
def ct_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    for seed in range(3):
        write_phantom(generate_ct(seed, CTOptions(matrix=48, slice_spacing=6.0, z_extent_mm=180.0)),
                      root / f"ct-{seed:05d}")
    return load_cases(root)


def test_plan_follows_the_fingerprint(ct_cases, tmp_path):
    plan = make_plan(ct_cases, "tiny", budget_voxels=24**3, base_filters=4, min_spacing=6.0)
    assert plan.spatial_dims == 3 and plan.labels == ["liver", "spleen", "kidney_right", "kidney_left", "spine"]
    assert all(s >= 6.0 for s in plan.target_spacing)
    assert np.prod(plan.patch_size) <= 24**3 * 1.2
    assert plan.normalization.method == "ct" and plan.normalization.clip[0] < plan.normalization.clip[1]
    assert 2 not in plan.mirror_axes  # never mirror across left/right: kidneys would swap
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan  # the written plan is what trains
    assert json.loads((tmp_path / "plan.json").read_text())["fingerprint"]["cases"] == 3


def test_two_epochs_lower_the_loss_and_write_a_loadable_model(ct_cases, tmp_path):
    plan = make_plan(ct_cases, "tiny-ct", budget_voxels=24**3, base_filters=4, min_spacing=6.0)
    plan = plan.model_copy(update={"epochs": 2, "steps_per_epoch": 6, "validation_cases": 1, "validate_every": 1})
    result = train(plan, ct_cases, tmp_path / "tiny-ct", device="cpu", command="test", progress=False)
    assert len(result.epoch_losses) == 2 and result.epoch_losses[1] < result.epoch_losses[0]
    assert [c.ok for c in check_model(tmp_path / "tiny-ct")] == [True, True, True]
    manifest, net = load_model(tmp_path / "tiny-ct")
    assert manifest.training["validation_cases"] == ["ct-00000"] and set(result.validation) == set(plan.labels)
    assert manifest.labels[0].type.value == "10200004"  # liver, SNOMED CT
    card = (tmp_path / "tiny-ct" / "MODEL_CARD.md").read_text()
    assert "synthetic" in card.lower() and "Command: `test`" in card
    assert (tmp_path / "tiny-ct" / "plan.json").exists()


def test_2d_training_runs(tmp_path):
    for seed in range(2):
        write_dx(generate_dx(seed, DXOptions(matrix=96)), tmp_path / "data" / f"dx-{seed:05d}")
    cases = load_cases(tmp_path / "data")
    plan = make_plan(cases, "tiny-dx", budget_voxels=32**2, base_filters=4, min_spacing=8.0)
    assert plan.spatial_dims == 2 and plan.normalization.method == "percentile"
    plan = plan.model_copy(update={"epochs": 1, "steps_per_epoch": 2, "validation_cases": 1})
    result = train(plan, cases, tmp_path / "tiny-dx", device="cpu", progress=False)
    _, net = load_model(tmp_path / "tiny-dx")
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, *plan.patch_size)).shape[1] == 5
    assert "lung_right" in result.validation


def test_reversed_series_loads_in_canonical_order(tmp_path):
    for name, reverse in (("a", False), ("b", True)):
        write_phantom(generate_ct(7, CTOptions(matrix=32, slice_spacing=8.0, z_extent_mm=160.0,
                                               reversed_order=reverse)), tmp_path / name)
    from segnode.training.data import load_case

    a, b = load_case(tmp_path / "a"), load_case(tmp_path / "b")
    assert np.array_equal(a.labels, b.labels)  # same anatomy, same orientation
    # noise is drawn per instance, so compare slice means (noise averages out over 1024 pixels)
    assert np.abs(a.image.mean(axis=(1, 2)) - b.image.mean(axis=(1, 2))).max() < 3.0


def test_elastic_deformation_follows_the_plan(ct_cases):
    """The U-Net paper's setting by default: 3x3 control points, displacement sigma 10 px."""
    from segnode.training.trainer import _augmenter

    plan = make_plan(ct_cases, "x", budget_voxels=24**3, base_filters=4, min_spacing=6.0)
    assert plan.elastic_grid == 3 and plan.elastic_magnitude_px == (10.0, 10.0)
    plan2d = plan.model_copy(update={"spatial_dims": 2, "patch_size": [64, 64], "rotate_degrees": 0.0})
    elastic = [t for t in _augmenter(plan2d).transforms if type(t).__name__ == "Rand2DElasticd"][0]
    deform = elastic.rand_2d_elastic.deform_grid
    assert list(deform.spacing) == [32.0, 32.0] and deform.magnitude == (10.0, 10.0)


def test_the_card_names_each_kind_of_training_series():
    from segnode.training.data import Case
    from segnode.training.trainer import _data_summary

    def case(seed: int, **options: object) -> Case:
        opts = {"matrix": 128, "oblique_deg": 0.0, "tilt_deg": 0.0, "reversed_order": False, **options}
        return Case(name=f"ct-{seed}", image=np.zeros(1), labels=np.zeros(1), spacing=(1.0,), modality="CT",
                    label_names={}, origin={"generator": "ct", "seed": seed, "options": opts})

    summary = _data_summary([case(0), case(1), case(2, oblique_deg=12.0), case(3, tilt_deg=15.0)])
    assert summary == ("segnode CT phantoms, seeds 0..1 (2): matrix 128; seeds 2..2 (1): matrix 128, oblique_deg 12.0; "
                       "seeds 3..3 (1): matrix 128, tilt_deg 15.0")
