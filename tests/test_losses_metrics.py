"""Losses and metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segnode.training.losses import WeightedCrossEntropy, make_loss, unet_weight_map
from segnode.training.metrics import label_metrics


def test_dice_and_iou_of_known_masks():
    ref = np.zeros((10, 10), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0:10] = 1  # 10 pixels
    pred[0, 4:10] = 1  # 6 of them
    pred[1, 0:2] = 1  # and 2 outside: 8 pixels
    ref[5:7, 5:7] = 2  # label 2: 4 pixels, predicted exactly
    pred[5:7, 5:7] = 2
    m = label_metrics(pred, ref, [1, 2], spacing=[1.0, 1.0])
    assert m[1]["dice"] == pytest.approx(2 * 6 / (10 + 8))  # 0.667
    assert m[1]["iou"] == pytest.approx(6 / (10 + 8 - 6))  # 0.5
    assert m[2]["dice"] == pytest.approx(1.0) and m[2]["iou"] == pytest.approx(1.0)
    assert m[2]["hd95"] == pytest.approx(0.0)


def _sphere(shape, center_mm, radius_mm, spacing=(1.0, 1.0, 1.0)):
    """A sphere in millimetres, sampled on voxels of the given spacing."""
    z, y, x = (np.indices(shape).T * np.array(spacing)).T
    return ((z - center_mm[0]) ** 2 + (y - center_mm[1]) ** 2 + (x - center_mm[2]) ** 2) <= radius_mm**2


def test_hd95_of_a_shifted_sphere():
    # Shifted by d along x, a surface point at angle t from the x axis is d*|cos t| from the other
    # surface; |cos t| is uniform on a sphere, so the 95th percentile is 0.95 d (the maximum is d).
    shape, d = (40, 40, 48), 4
    ref = _sphere(shape, (20, 20, 20), 12).astype(np.uint8)
    pred = _sphere(shape, (20, 20, 20 + d), 12).astype(np.uint8)
    m = label_metrics(pred, ref, [1], spacing=[1.0, 1.0, 1.0])
    assert m[1]["hd95"] == pytest.approx(0.95 * d, abs=0.5)
    # the same in millimetres on 2 mm voxels along x: a 12 mm sphere shifted by 4 mm
    ref = _sphere((40, 40, 24), (20, 20, 20), 12, (1, 1, 2)).astype(np.uint8)
    pred = _sphere((40, 40, 24), (20, 20, 24), 12, (1, 1, 2)).astype(np.uint8)
    wide = label_metrics(pred, ref, [1], spacing=[1.0, 1.0, 2.0])
    assert wide[1]["hd95"] == pytest.approx(0.95 * 4, abs=1.0)


def test_absent_label_has_no_hd95():
    ref = np.zeros((8, 8), dtype=np.uint8)
    ref[2:4, 2:4] = 1
    m = label_metrics(np.zeros_like(ref), ref, [1], spacing=[1, 1])
    assert m[1]["dice"] == 0.0 and math.isnan(m[1]["hd95"])


def test_unet_weight_map_by_hand():
    labels = np.zeros((9, 9), dtype=np.uint8)
    labels[:, 0:4] = 1  # two objects separated by a one-pixel gap (column 4)
    labels[:, 5:9] = 1
    w = unet_weight_map(labels, w0=10.0, sigma=5.0)
    wc_bg = labels.size / (2 * 9)  # background: 9 pixels, two classes
    wc_fg = labels.size / (2 * 72)
    assert w[4, 4] == pytest.approx(wc_bg + 10 * math.exp(-((1 + 1) ** 2) / 50), rel=1e-5)
    assert w[0, 0] == pytest.approx(wc_fg)


def test_weighted_ce_with_uniform_weights_is_plain_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6)
    target = torch.ones(2, 1, 6, 6, dtype=torch.long)  # one class, one object: uniform weight map
    assert WeightedCrossEntropy()(logits, target) == pytest.approx(
        float(F.cross_entropy(logits, target[:, 0])), rel=1e-5)


@pytest.mark.parametrize("name", ["dice_ce", "focal", "weighted_ce"])
def test_losses_reward_the_right_answer(name):
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[0, 0, 2:6, 2:6] = 1
    right = F.one_hot(target[:, 0], 2).movedim(-1, 1).float() * 20 - 10
    loss = make_loss(name)
    assert float(loss(right, target)) < float(loss(-right, target))
    assert float(loss(right, target)) < 0.05
