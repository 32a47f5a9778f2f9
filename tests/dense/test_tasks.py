"""Dense tasks' losses and metric meters on hand-computed cases, and Δm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualhead.dense.data import DenseBatch
from dualhead.dense.metrics import delta_m
from dualhead.dense.tasks import DENSE_TASKS, DepthTask, NormalsTask, SegmentationTask


def batch(**labels) -> DenseBatch:
    some = next(iter(labels.values()))
    return DenseBatch(images=torch.zeros(some.shape[0], 3, *some.shape[-2:]), **labels)


# -- segmentation --------------------------------------------------------------------------------


def test_segmentation_loss_is_cross_entropy_over_labelled_pixels():
    logits = torch.randn(2, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 2]], [[2, 255], [255, 255]]])
    loss = SegmentationTask(3).loss(logits, batch(seg=labels))
    pixels = logits.permute(0, 2, 3, 1).reshape(-1, 3)
    flat = labels.reshape(-1)
    keep = flat != 255
    torch.testing.assert_close(loss, F.cross_entropy(pixels[keep], flat[keep]))


def test_segmentation_loss_is_none_without_labels():
    task = SegmentationTask(3)
    assert task.loss(torch.randn(1, 3, 2, 2), batch(seg=torch.full((1, 2, 2), 255))) is None
    assert task.loss(torch.randn(1, 3, 2, 2), batch(depth=torch.ones(1, 1, 2, 2))) is None


def test_segmentation_meter_miou_and_pixel_accuracy_by_hand():
    task = SegmentationTask(3)
    meter = task.meter()
    # Predictions (argmax) vs labels over two batches; label 255 is skipped.
    predicted = torch.tensor([[[0, 0], [1, 2]]])
    labels = torch.tensor([[[0, 1], [1, 255]]])
    meter.update(F.one_hot(predicted, 3).permute(0, 3, 1, 2).float(), batch(seg=labels))
    meter.update(F.one_hot(torch.tensor([[[1, 0]]]), 3).permute(0, 3, 1, 2).float(), batch(seg=torch.tensor([[[1, 0]]])))
    # Pairs (label, prediction): (0,0) (1,0) (1,1) (1,1) (0,0) -> class 0: hits 2, union 3; class 1: hits 2,
    # union 3; class 2 never occurs among labelled pixels (its prediction sat on an ignored pixel).
    result = meter.compute()
    assert result["miou"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert result["pixel_acc"] == pytest.approx(4 / 5)
    assert set(result) == set(task.metrics)


# -- depth ---------------------------------------------------------------------------------------


def test_depth_loss_is_l1_over_pixels_with_depth():
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    labels = torch.tensor([[[[2.0, 0.0], [3.5, 1.0]]]])  # 0: no measurement
    loss = DepthTask().loss(prediction, batch(depth=labels))
    assert float(loss) == pytest.approx((1.0 + 0.5 + 3.0) / 3)
    assert DepthTask().loss(prediction, batch(depth=torch.zeros(1, 1, 2, 2))) is None


def test_depth_meter_is_exact_over_pixels_not_batches():
    task = DepthTask()
    meter = task.meter()
    meter.update(torch.tensor([[[[1.0, 5.0]]]]), batch(depth=torch.tensor([[[[2.0, 0.0]]]])))
    meter.update(torch.tensor([[[[4.0, 4.0, 1.0]]]]), batch(depth=torch.tensor([[[[2.0, 5.0, 1.0]]]])))
    # errors 1, 2, 1, 0 over labels 2, 2, 5, 1
    assert meter.compute() == pytest.approx({"abs_err": 4 / 4, "rel_err": (0.5 + 1.0 + 0.2 + 0.0) / 4})


def test_depth_head_starts_at_the_mean_depth():
    spec = DepthTask(initial_depth=4.2).head()
    assert spec.activation == "softplus" and spec.channels == 1
    assert F.softplus(torch.tensor(spec.bias, dtype=torch.float64)).item() == pytest.approx(4.2)


# -- normals ---------------------------------------------------------------------------------------


def normals_at(angles_deg: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (0, 0, -1) and predictions rotated from them by the given angles, scaled by 3 (not unit)."""
    radians = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    prediction = torch.stack([torch.sin(radians), torch.zeros_like(radians), -torch.cos(radians)]) * 3
    labels = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64).view(3, 1).expand(3, len(angles_deg))
    return prediction.float().view(1, 3, 1, -1), labels.float().reshape(1, 3, 1, -1).contiguous()


def test_normals_loss_is_one_minus_cosine_over_labelled_pixels():
    prediction, labels = normals_at([0.0, 60.0, 90.0])
    labels[..., 2] = 0  # the 90-degree pixel is unlabelled
    loss = NormalsTask().loss(prediction, batch(normals=labels))
    assert float(loss) == pytest.approx(1 - (1.0 + 0.5) / 2, abs=1e-6)
    assert NormalsTask().loss(prediction, batch(normals=torch.zeros_like(labels))) is None


def test_normals_meter_by_hand():
    meter = NormalsTask().meter()
    prediction, labels = normals_at([5.0, 15.0, 25.0])
    meter.update(prediction, batch(normals=labels))
    prediction, labels = normals_at([40.0, 90.0, 0.0])
    labels[..., 2] = 0  # unlabelled: the 0-degree pixel does not count
    meter.update(prediction, batch(normals=labels))
    result = meter.compute()
    assert result["mean_angle"] == pytest.approx((5 + 15 + 25 + 40 + 90) / 5, abs=1e-3)
    assert result["median_angle"] == pytest.approx(25.0, abs=0.01)
    assert result["within_11.25"] == pytest.approx(1 / 5)
    assert result["within_22.5"] == pytest.approx(2 / 5)
    assert result["within_30"] == pytest.approx(3 / 5)
    assert set(result) == set(NormalsTask.metrics)


def test_empty_meters_report_nan_not_zero():
    for task in (SegmentationTask(2), DepthTask(), NormalsTask()):
        assert all(math.isnan(v) for v in task.meter().compute().values())


def test_registry_and_directions():
    assert set(DENSE_TASKS) == {"seg", "depth", "normals", "detection", "keypoints"}
    assert SegmentationTask(2).higher_is_better and not DepthTask().higher_is_better and not NormalsTask().higher_is_better
    assert NormalsTask.metrics["within_30"] and not NormalsTask.metrics["median_angle"]


# -- delta_m ---------------------------------------------------------------------------------------


def test_delta_m_by_hand():
    directions = {"seg/miou": True, "depth/abs_err": False, "normals/mean_angle": False}
    single = {"seg/miou": 0.50, "depth/abs_err": 0.40, "normals/mean_angle": 20.0}
    multi = {"seg/miou": 0.55, "depth/abs_err": 0.50, "normals/mean_angle": 19.0, "loss": 3.0}
    # +10% (miou up), -25% (abs_err up by a quarter), +5% (angle down by a twentieth): mean -10/3 %
    assert delta_m(multi, single, directions) == pytest.approx((10 - 25 + 5) / 3)
    assert delta_m(single, single, directions) == 0


def test_delta_m_errors():
    with pytest.raises(KeyError, match="depth/abs_err"):
        delta_m({"seg/miou": 1.0}, {"seg/miou": 1.0}, {"seg/miou": True, "depth/abs_err": False})
    with pytest.raises(ValueError, match="is 0"):
        delta_m({"a": 1.0}, {"a": 0.0}, {"a": True})
