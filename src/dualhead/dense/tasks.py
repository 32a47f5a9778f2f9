"""The dense tasks: semantic segmentation, depth and surface normals, each labelled per pixel
(detection and keypoints, labelled per object, are in `dualhead.dense.detection`).

A task reads its labels from the batch attribute of its own name (``batch.seg``, ``batch.depth``,
``batch.normals``) and learns only from labelled pixels; a batch without any returns no loss. Each
task also says what its head must output (`HeadSpec`), so architectures need not know the tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from dualhead.core.registry import Registry
from dualhead.core.task import MetricMeter, Task
from dualhead.dense.metrics import (
    ANGLE_THRESHOLDS,
    IGNORE_INDEX,
    DepthMeter,
    NormalsMeter,
    SegmentationMeter,
    normal_mask,
)

DENSE_TASKS: Registry[type[DenseTask]] = Registry("dense task")


@dataclass(frozen=True)
class HeadSpec:
    """What a task's head outputs: channels, the activation on them, the initial bias of its last layer.

    ``kind="set"`` (detection, keypoints: `dualhead.dense.detection`) asks for a set prediction
    instead of a map: per query `channels` class logits then `coordinates` values in [0, 1], as
    ``[B, Q, channels + coordinates]``; only architectures with ``supports_set_tasks`` build it.
    """

    channels: int
    activation: str = "identity"  # identity | softplus (positive outputs)
    bias: float = 0.0
    kind: str = "dense"  # dense (a [B, channels, H, W] map) | set (per query: logits and coordinates)
    coordinates: int = 0  # set: coordinates per query (a box: 4; K keypoints: 2K)


class DenseTask(Task):
    """A per-pixel task whose labels are ``batch.<name>`` (None where the batch has none)."""

    @classmethod
    def for_dataset(cls, dataset: Any) -> DenseTask:
        """The task as `dataset` (a `dualhead.dense.data.DenseDataset`) labels it."""
        return cls()

    def head(self) -> HeadSpec:
        raise NotImplementedError

    def labels(self, batch: Any) -> Tensor | None:
        return getattr(batch, self.name, None)

    def meter(self) -> MetricMeter:
        return _BatchMeter(self._meter(), self)

    def _meter(self) -> MetricMeter:
        raise NotImplementedError


class _BatchMeter(MetricMeter):
    """Feeds a label meter the task's labels of each batch (batches without them are skipped)."""

    def __init__(self, meter: MetricMeter, task: DenseTask):
        self.inner, self.task = meter, task

    def update(self, prediction: Tensor, batch: Any) -> None:
        labels = self.task.labels(batch)
        if labels is not None:
            self.inner.update(prediction, labels)

    def compute(self) -> dict[str, float]:
        return self.inner.compute()


@DENSE_TASKS.register("seg")
class SegmentationTask(DenseTask):
    """Semantic segmentation: cross-entropy over labelled pixels (label 255 = unlabelled)."""

    name = "seg"
    metrics = {"miou": True, "pixel_acc": True}
    primary_metric = "miou"

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    @classmethod
    def for_dataset(cls, dataset: Any) -> SegmentationTask:
        return cls(dataset.num_classes)

    def head(self) -> HeadSpec:
        return HeadSpec(self.num_classes)

    def loss(self, prediction: Tensor, batch: Any) -> Tensor | None:
        labels = self.labels(batch)
        if labels is None or not (labels != IGNORE_INDEX).any():
            return None
        return F.cross_entropy(prediction.float(), labels, ignore_index=IGNORE_INDEX)

    def loss_count(self, batch: Any) -> int:
        labels = self.labels(batch)
        return 0 if labels is None else int((labels != IGNORE_INDEX).sum())

    def _meter(self) -> MetricMeter:
        return SegmentationMeter(self.num_classes)


@DENSE_TASKS.register("depth")
class DepthTask(DenseTask):
    """Depth: L1 over pixels with a depth label (label 0 = none); the head's output is positive
    (softplus) and starts near the training set's mean depth."""

    name = "depth"
    metrics = {"abs_err": False, "rel_err": False}
    primary_metric = "abs_err"

    def __init__(self, initial_depth: float = 1.0):
        super().__init__()
        if initial_depth <= 0:
            raise ValueError(f"initial_depth must be positive, got {initial_depth}")
        self.initial_depth = initial_depth

    @classmethod
    def for_dataset(cls, dataset: Any) -> DepthTask:
        return cls(dataset.mean_depth())

    def head(self) -> HeadSpec:
        # The inverse of softplus, so that the untrained head predicts the mean depth.
        return HeadSpec(1, "softplus", bias=self.initial_depth + math.log(-math.expm1(-self.initial_depth)))

    def loss(self, prediction: Tensor, batch: Any) -> Tensor | None:
        labels = self.labels(batch)
        if labels is None:
            return None
        valid = labels > 0
        if not valid.any():
            return None
        return (prediction.float()[valid] - labels[valid]).abs().mean()

    def loss_count(self, batch: Any) -> int:
        labels = self.labels(batch)
        return 0 if labels is None else int((labels > 0).sum())

    def _meter(self) -> MetricMeter:
        return DepthMeter()


@DENSE_TASKS.register("normals")
class NormalsTask(DenseTask):
    """Surface normals: 1 - cosine between the normalised prediction and the label, over labelled
    pixels (a zero label vector = none)."""

    name = "normals"
    metrics = {"mean_angle": False, "median_angle": False} | {f"within_{t:g}": True for t in ANGLE_THRESHOLDS}
    primary_metric = "mean_angle"

    def head(self) -> HeadSpec:
        return HeadSpec(3)

    def loss(self, prediction: Tensor, batch: Any) -> Tensor | None:
        labels = self.labels(batch)
        if labels is None:
            return None
        valid = normal_mask(labels)
        if not valid.any():
            return None
        cosine = (F.normalize(prediction.float(), dim=1) * F.normalize(labels.float(), dim=1)).sum(dim=1)
        return 1 - cosine[valid].mean()

    def loss_count(self, batch: Any) -> int:
        labels = self.labels(batch)
        return 0 if labels is None else int(normal_mask(labels).sum())

    def _meter(self) -> MetricMeter:
        return NormalsMeter()


# The object tasks (detection, keypoints) register themselves in DENSE_TASKS.
from dualhead.dense import detection as _detection  # noqa: E402, F401
