"""Dense-prediction metrics, accumulated exactly over a split, and the multi-task gain Δm.

Each meter sums per-pixel quantities over every batch (a confusion matrix, error sums, angle
counts), so a split's figure does not depend on how it was cut into batches. The definitions are
those of the NYUv2 / Cityscapes literature as LibMTL implements them (Liu et al., MTAN, CVPR 2019).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from dualhead.core.task import MetricMeter

IGNORE_INDEX = 255  # segmentation label of unlabelled pixels
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)  # degrees
_ANGLE_BIN = 0.01  # degrees: resolution of the median angle


class SegmentationMeter(MetricMeter):
    """Mean IoU over the classes that occur (in labels or predictions) and pixel accuracy."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [label, prediction]

    def update(self, prediction: Tensor, labels: Tensor) -> None:
        """`prediction`: [B, C, H, W] logits; `labels`: [B, H, W] class indices, `IGNORE_INDEX` skipped."""
        valid = labels != IGNORE_INDEX
        pairs = labels[valid] * self.num_classes + prediction.argmax(dim=1)[valid]
        counts = torch.bincount(pairs, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)
        self.confusion += counts.cpu()

    def compute(self) -> dict[str, float]:
        hits = self.confusion.diag().double()
        union = self.confusion.sum(0) + self.confusion.sum(1) - self.confusion.diag()
        present = union > 0
        total = self.confusion.sum()
        return {
            "miou": float((hits[present] / union[present]).mean()) if present.any() else math.nan,
            "pixel_acc": float(hits.sum() / total) if total else math.nan,
        }


class DepthMeter(MetricMeter):
    """Mean absolute and mean relative error over the pixels with a depth label (depth > 0)."""

    def __init__(self) -> None:
        self.abs_sum = self.rel_sum = 0.0
        self.pixels = 0

    def update(self, prediction: Tensor, labels: Tensor) -> None:
        """`prediction`, `labels`: [B, 1, H, W]; label 0 marks a pixel without depth."""
        valid = labels > 0
        error = (prediction[valid].double() - labels[valid].double()).abs()
        self.abs_sum += float(error.sum())
        self.rel_sum += float((error / labels[valid].double()).sum())
        self.pixels += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if not self.pixels:
            return {"abs_err": math.nan, "rel_err": math.nan}
        return {"abs_err": self.abs_sum / self.pixels, "rel_err": self.rel_sum / self.pixels}


class NormalsMeter(MetricMeter):
    """Angle between predicted and true normals over labelled pixels (a zero label vector marks none):
    mean, median (to 0.01 degree) and the fraction within 11.25, 22.5 and 30 degrees."""

    def __init__(self) -> None:
        self.histogram = torch.zeros(round(180 / _ANGLE_BIN) + 1, dtype=torch.int64)
        self.angle_sum = 0.0
        self.within = dict.fromkeys(ANGLE_THRESHOLDS, 0)

    def update(self, prediction: Tensor, labels: Tensor) -> None:
        """`prediction`, `labels`: [B, 3, H, W]; predictions need not be unit vectors."""
        angles = angle_errors(prediction, labels)
        self.angle_sum += float(angles.double().sum())
        for threshold in ANGLE_THRESHOLDS:
            self.within[threshold] += int((angles < threshold).sum())
        bins = (angles / _ANGLE_BIN).long().clamp(max=len(self.histogram) - 1)
        self.histogram += torch.bincount(bins, minlength=len(self.histogram)).cpu()

    def compute(self) -> dict[str, float]:
        pixels = int(self.histogram.sum())
        if not pixels:
            return {"mean_angle": math.nan, "median_angle": math.nan} | {_within_key(t): math.nan for t in ANGLE_THRESHOLDS}
        median_bin = int(torch.searchsorted(self.histogram.cumsum(0), (pixels + 1) // 2))
        return {
            "mean_angle": self.angle_sum / pixels,
            "median_angle": (median_bin + 0.5) * _ANGLE_BIN,
            **{_within_key(t): self.within[t] / pixels for t in ANGLE_THRESHOLDS},
        }


def _within_key(threshold: float) -> str:
    return f"within_{threshold:g}"


def normal_mask(labels: Tensor) -> Tensor:
    """[B, H, W]: pixels whose normal label is not the zero vector."""
    return labels.abs().sum(dim=1) > 0


def angle_errors(prediction: Tensor, labels: Tensor) -> Tensor:
    """Angles in degrees between predicted and labelled normals at the labelled pixels (1-D)."""
    valid = normal_mask(labels)
    cosine = (_unit(prediction.float()) * _unit(labels.float())).sum(dim=1)[valid]
    return torch.rad2deg(torch.arccos(cosine.clamp(-1.0, 1.0)))


def _unit(vectors: Tensor) -> Tensor:
    return torch.nn.functional.normalize(vectors, dim=1)


def delta_m(multi: Mapping[str, float], single: Mapping[str, float], directions: Mapping[str, bool]) -> float:
    """Δm in percent: the mean relative gain of a multi-task model over single-task baselines.

    Δm = 100/M Σ_m (-1)^{l_m} (M_multi,m - M_single,m) / M_single,m over the M metrics in
    `directions` (metric -> higher is better), with l_m = 1 where lower is better (Maninis et al.,
    CVPR 2019; Vandenhende et al., TPAMI 2021), so a positive Δm means better than the baselines.
    LibMTL's Δp first averages the metrics of each task, then over tasks; this is the plain mean
    over metrics.
    """
    if not directions:
        raise ValueError("delta_m needs at least one metric")
    missing = [m for m in directions if m not in multi or m not in single]
    if missing:
        raise KeyError(f"delta_m: metrics missing from the results: {', '.join(missing)}")
    gains = []
    for metric, higher_is_better in directions.items():
        if single[metric] == 0:
            raise ValueError(f"delta_m: the baseline's {metric} is 0, so a relative change is undefined")
        change = (multi[metric] - single[metric]) / single[metric]
        gains.append(change if higher_is_better else -change)
    return 100.0 * sum(gains) / len(gains)
