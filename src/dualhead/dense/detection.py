"""Object tasks: detection and keypoints as set prediction (DETR, Carion et al. 2020).

A model predicts a fixed set of Q queries per image; each query gives class logits over the C object
classes plus "no object" (the last index) and its coordinates in [0, 1]: a box (normalised
``cx, cy, w, h``) for ``detection``, K keypoints (normalised ``x, y`` pairs) for ``keypoints``. Training
pairs queries with an image's objects by the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`)
on a cost of class probability and coordinate distance (and GIoU for boxes); matched queries learn
their object's class and coordinates, the others "no object", down-weighted (``no_object_weight``).

Labels: ``batch.detection`` / ``batch.keypoints``, an `ObjectTargets` (variable-length per image).
Keypoints follow COCO's visibility (2 seen, 1 hidden behind something, 0 not labelled: outside the
image, or past the object's class's count, padded up to K); as in COCO, every labelled keypoint
(v > 0) is learnt and scored, occluded ones too.

Metrics: box mAP@[.5:.95] and mAP@0.5 by torchmetrics' ``MeanAveragePrecision`` (pycocotools
backend); keypoints: PCK@0.1 (below) and OKS-based AP by pycocotools' ``COCOeval`` (iouType
``keypoints``) with the per-keypoint sigmas of `KeypointTask` (0.07 for every keypoint: the mean of
COCO's 17 body sigmas, 0.067, rounded; the scenes' keypoints are geometric points, not body joints).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

from dualhead.core.task import MetricMeter
from dualhead.dense.tasks import DENSE_TASKS, DenseTask, HeadSpec

PCK_THRESHOLD = 0.1  # PCK: a keypoint is right within this fraction of its object's box size


@dataclass
class ObjectTargets:
    """Each image's objects (lists of one tensor per image; an image may have none).

    classes: ``[n]`` int64 in 0..C-1; boxes: ``[n, 4]`` normalised ``cx, cy, w, h``;
    keypoints: ``[n, K, 3]`` normalised ``x, y`` and COCO visibility (0 = not labelled).
    """

    classes: list[Tensor]
    boxes: list[Tensor]
    keypoints: list[Tensor]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ObjectTargets:
        def move(items: list[Tensor]) -> list[Tensor]:
            return [t.to(device, non_blocking=non_blocking) for t in items]

        return ObjectTargets(move(self.classes), move(self.boxes), move(self.keypoints))

    def __len__(self) -> int:
        return len(self.classes)


def object_targets(scenes: Sequence[dict[str, Any]], image_size: int, max_keypoints: int) -> ObjectTargets:
    """`ObjectTargets` from the scenes' per-object annotations (`dualhead.dense.scenes`: class 1..C,
    box ``[x0, y0, x1, y1)`` and keypoints ``[x, y, v]`` in pixels), keypoints padded to `max_keypoints`."""
    classes, boxes, keypoints = [], [], []
    for index, scene in enumerate(scenes):
        objects = scene["objects"]
        points = torch.zeros(len(objects), max_keypoints, 3)
        for k, obj in enumerate(objects):
            if len(obj["keypoints"]) > max_keypoints:
                raise ValueError(
                    f"scene {index}, object {k}: {len(obj['keypoints'])} keypoints, "
                    f"more than max_keypoints={max_keypoints}"
                )
            if obj["keypoints"]:
                points[k, : len(obj["keypoints"])] = torch.tensor(obj["keypoints"], dtype=torch.float32)
        points[..., :2] /= image_size
        classes.append(torch.tensor([obj["class"] - 1 for obj in objects], dtype=torch.int64))
        xyxy = torch.tensor([obj["box"] for obj in objects], dtype=torch.float32).reshape(-1, 4) / image_size
        boxes.append(box_convert(xyxy, "xyxy", "cxcywh"))
        keypoints.append(points)
    return ObjectTargets(classes, boxes, keypoints)


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """(query indices, object indices) of the assignment of least total cost (``cost``: [Q, n]);
    min(Q, n) pairs."""
    if cost.ndim != 2:
        raise ValueError(f"a matching cost must be [queries, objects], got shape {tuple(cost.shape)}")
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class SetPredictionTask(DenseTask):
    """A set-prediction task: ``[B, Q, C + 1 + D]`` predictions (class logits, then D coordinates),
    Hungarian matching per image, class cross-entropy over every query plus a coordinate loss over
    the matched ones. Subclasses give the coordinates' cost and loss."""

    coordinates = 0

    def __init__(self, num_classes: int, no_object_weight: float = 0.1, class_weight: float = 1.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"{self.name}: needs at least one object class, got {num_classes}")
        if not 0 < no_object_weight <= 1:
            raise ValueError(f"{self.name}: no_object_weight must be in (0, 1], got {no_object_weight}")
        self.num_classes = num_classes
        self.class_weight = class_weight
        weights = torch.ones(num_classes + 1)
        weights[-1] = no_object_weight
        self.register_buffer("ce_weights", weights, persistent=False)

    @classmethod
    def for_dataset(cls, dataset: Any) -> SetPredictionTask:
        return cls(dataset.num_object_classes)

    def head(self) -> HeadSpec:
        return HeadSpec(self.num_classes + 1, kind="set", coordinates=self.coordinates)

    def split(self, prediction: Tensor) -> tuple[Tensor, Tensor]:
        """(class logits [B, Q, C + 1], coordinates [B, Q, D]) of a prediction."""
        expected = self.num_classes + 1 + self.coordinates
        if prediction.ndim != 3 or prediction.shape[-1] != expected:
            raise ValueError(
                f"{self.name}: expected a [batch, queries, {expected}] prediction, "
                f"got shape {tuple(prediction.shape)}"
            )
        return prediction[..., : self.num_classes + 1], prediction[..., self.num_classes + 1 :]

    def coordinate_cost(self, coordinates: Tensor, targets: ObjectTargets, image: int) -> Tensor:
        """[Q, n]: how far each query's coordinates are from each object's (without the class)."""
        raise NotImplementedError

    def coordinate_loss(
        self, coordinates: Tensor, targets: ObjectTargets, image: int
    ) -> tuple[Tensor, float]:
        """(summed loss, how many it sums over) of matched queries' coordinates (``coordinates`` [m, D],
        in the order of image `image`'s objects)."""
        raise NotImplementedError

    def matching_cost(
        self, logits: Tensor, coordinates: Tensor, targets: ObjectTargets, image: int
    ) -> Tensor:
        """[Q, n] matching cost of one image: minus the class probability plus the coordinate cost."""
        probability = logits.float().softmax(-1)[:, targets.classes[image]]
        return -self.class_weight * probability + self.coordinate_cost(coordinates.float(), targets, image)

    @torch.no_grad()
    def match(self, prediction: Tensor, targets: ObjectTargets) -> list[tuple[Tensor, Tensor]]:
        """Per image, (query indices, object indices) of the least-cost assignment."""
        logits, coordinates = self.split(prediction)
        if len(targets) != len(prediction):
            raise ValueError(f"{self.name}: {len(prediction)} predictions for {len(targets)} labelled images")
        return [
            hungarian_match(self.matching_cost(logits[b], coordinates[b], targets, b))
            for b in range(len(targets))
        ]

    def loss(self, prediction: Tensor, batch: Any) -> Tensor | None:
        targets = self.labels(batch)
        if targets is None or len(targets) == 0:
            return None
        logits, coordinates = self.split(prediction.float())
        pairs = self.match(prediction, targets)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        total, count = logits.new_zeros(()), 0.0
        for b, (queries, objects) in enumerate(pairs):
            queries, objects = queries.to(logits.device), objects.to(logits.device)
            classes[b, queries] = targets.classes[b][objects]
            subset = _select(targets, b, objects)
            summed, n = self.coordinate_loss(coordinates[b, queries], subset, 0)
            total, count = total + summed, count + n
        class_loss = F.cross_entropy(
            logits.flatten(0, 1), classes.flatten(), weight=self.ce_weights.to(logits.device)
        )
        return self.class_weight * class_loss + total / max(count, 1.0)

    def loss_count(self, batch: Any) -> int:
        targets = self.labels(batch)
        return 0 if targets is None else len(targets)

    def meter(self) -> MetricMeter:
        return self._meter()


def _select(targets: ObjectTargets, image: int, objects: Tensor) -> ObjectTargets:
    """One image's objects `objects`, in that order, as a one-image `ObjectTargets`."""
    return ObjectTargets(
        [targets.classes[image][objects]],
        [targets.boxes[image][objects]],
        [targets.keypoints[image][objects]],
    )


@DENSE_TASKS.register("detection")
class DetectionTask(SetPredictionTask):
    """Boxes as a set: matching cost and loss ``class + l1_weight * L1 + giou_weight * (1 - GIoU)``
    (DETR's weights 1, 5, 2) on normalised ``cx, cy, w, h``; the box terms average over objects."""

    name = "detection"
    metrics = {"map": True, "map_50": True, "map_75": True}
    primary_metric = "map"
    coordinates = 4

    def __init__(
        self,
        num_classes: int,
        no_object_weight: float = 0.1,
        class_weight: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
    ):
        super().__init__(num_classes, no_object_weight, class_weight)
        self.l1_weight, self.giou_weight = l1_weight, giou_weight

    def coordinate_cost(self, coordinates: Tensor, targets: ObjectTargets, image: int) -> Tensor:
        boxes = targets.boxes[image].float()
        l1 = torch.cdist(coordinates, boxes, p=1)
        giou = generalized_box_iou(_xyxy(coordinates), _xyxy(boxes))
        return self.l1_weight * l1 - self.giou_weight * giou

    def coordinate_loss(
        self, coordinates: Tensor, targets: ObjectTargets, image: int
    ) -> tuple[Tensor, float]:
        boxes = targets.boxes[image].float()
        l1 = (coordinates - boxes).abs().sum()
        giou = (
            torch.diag(generalized_box_iou(_xyxy(coordinates), _xyxy(boxes)))
            if len(boxes)
            else boxes.new_zeros(0)
        )
        return self.l1_weight * l1 + self.giou_weight * (1 - giou).sum(), float(len(boxes))

    def _meter(self) -> MetricMeter:
        return DetectionMeter(self)


@DENSE_TASKS.register("keypoints")
class KeypointTask(SetPredictionTask):
    """K keypoints per object as a set: each query gives class logits and K normalised ``x, y``;
    matching cost ``class + point_weight * mean L1 over the object's labelled keypoints``, loss
    ``class + point_weight * L1`` averaged over matched labelled keypoints (``x`` and ``y`` summed).

    Metrics: ``pck`` (PCK@0.1: the share of labelled keypoints of ground-truth objects within 0.1 of
    their box's larger side of the keypoint; each object is paired with a query by the same Hungarian
    matching as training, so it measures localisation given the best query) and ``oks_ap`` /
    ``oks_ap_50`` (COCO keypoint AP over every query, scored by its class probability, with
    `oks_sigmas`)."""

    name = "keypoints"
    metrics = {"pck": True, "oks_ap": True, "oks_ap_50": True}
    primary_metric = "pck"

    def __init__(
        self,
        num_classes: int,
        num_keypoints: int,
        no_object_weight: float = 0.1,
        class_weight: float = 1.0,
        point_weight: float = 5.0,
        oks_sigmas: Sequence[float] | None = None,
    ):
        if num_keypoints < 1:
            raise ValueError(f"keypoints: needs at least one keypoint per object, got {num_keypoints}")
        super().__init__(num_classes, no_object_weight, class_weight)
        self.coordinates = 2 * num_keypoints
        self.num_keypoints, self.point_weight = num_keypoints, point_weight
        self.oks_sigmas = (
            np.full(num_keypoints, 0.07) if oks_sigmas is None else np.asarray(oks_sigmas, dtype=float)
        )
        if self.oks_sigmas.shape != (num_keypoints,):
            raise ValueError(
                f"keypoints: need one OKS sigma per keypoint ({num_keypoints}), got {len(self.oks_sigmas)}"
            )

    @classmethod
    def for_dataset(cls, dataset: Any) -> KeypointTask:
        return cls(dataset.num_object_classes, dataset.max_keypoints)

    def coordinate_cost(self, coordinates: Tensor, targets: ObjectTargets, image: int) -> Tensor:
        points = targets.keypoints[image].float()
        labelled = (points[..., 2] > 0).float()  # [n, K]
        predicted = coordinates.view(len(coordinates), 1, self.num_keypoints, 2)
        distance = (predicted - points[None, ..., :2]).abs().sum(-1)  # [Q, n, K]
        return self.point_weight * (distance * labelled).sum(-1) / labelled.sum(-1).clamp(min=1)

    def coordinate_loss(
        self, coordinates: Tensor, targets: ObjectTargets, image: int
    ) -> tuple[Tensor, float]:
        points = targets.keypoints[image].float()
        labelled = points[..., 2] > 0
        predicted = coordinates.view(len(coordinates), self.num_keypoints, 2)
        l1 = ((predicted - points[..., :2]).abs().sum(-1) * labelled).sum()
        return self.point_weight * l1, float(labelled.sum())

    def _meter(self) -> MetricMeter:
        return KeypointMeter(self)


def _xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def _pixels(batch: Any) -> Tensor:
    """``[W, H]`` of the batch's images, to scale normalised coordinates to pixels."""
    height, width = batch.images.shape[-2:]
    return torch.tensor([width, height], dtype=torch.float32)


def _detections(task: SetPredictionTask, prediction: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per query: (score, object class, coordinates): the most probable object class and its probability."""
    logits, coordinates = task.split(prediction.float().cpu())
    scores, labels = logits.softmax(-1)[..., : task.num_classes].max(-1)
    return scores, labels, coordinates


class DetectionMeter(MetricMeter):
    """Box mAP@[.5:.95], @0.5 and @0.75 over every query (score: its most probable object class),
    by torchmetrics' COCO-style ``MeanAveragePrecision`` in pixels."""

    def __init__(self, task: DetectionTask):
        from torchmetrics.detection import MeanAveragePrecision

        self.task = task
        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def update(self, prediction: Tensor, batch: Any) -> None:
        targets = self.task.labels(batch)
        if targets is None:
            return
        scale = _pixels(batch).repeat(2)
        scores, labels, boxes = _detections(self.task, prediction)
        predicted = [
            {"boxes": _xyxy(boxes[b]) * scale, "scores": scores[b], "labels": labels[b]}
            for b in range(len(targets))
        ]
        truth = [
            {"boxes": _xyxy(targets.boxes[b].float().cpu()) * scale, "labels": targets.classes[b].cpu()}
            for b in range(len(targets))
        ]
        self.metric.update(predicted, truth)

    def compute(self) -> dict[str, float]:
        """The mAPs; NaN (not zero) where no ground-truth object was seen, as the other dense meters."""
        if not self.metric.update_count:
            return dict.fromkeys(("map", "map_50", "map_75"), float("nan"))
        result = self.metric.compute()
        return {key: _or_nan(float(result[key])) for key in ("map", "map_50", "map_75")}


class KeypointMeter(MetricMeter):
    """PCK@0.1 on matched queries, and COCO keypoint AP (pycocotools' COCOeval) over every query."""

    def __init__(self, task: KeypointTask):
        self.task = task
        self.correct = self.labelled = 0
        self.images: list[dict[str, Any]] = []
        self.truth: list[dict[str, Any]] = []
        self.detections: list[dict[str, Any]] = []

    def update(self, prediction: Tensor, batch: Any) -> None:
        targets = self.task.labels(batch)
        if targets is None:
            return
        targets = targets.to("cpu")
        prediction = prediction.float().cpu()
        scale = _pixels(batch)
        k = self.task.num_keypoints
        for b, (queries, objects) in enumerate(self.task.match(prediction, targets)):
            points = targets.keypoints[b]
            labelled = points[objects, :, 2] > 0
            predicted = self.task.split(prediction)[1][b, queries].view(-1, k, 2) * scale
            distance = (predicted - points[objects, :, :2] * scale).norm(dim=-1)
            size = _xyxy(targets.boxes[b][objects]).mul(scale.repeat(2))
            side = torch.maximum(size[:, 2] - size[:, 0], size[:, 3] - size[:, 1])
            self.correct += int(((distance <= PCK_THRESHOLD * side[:, None]) & labelled).sum())
            self.labelled += int((points[..., 2] > 0).sum())  # unmatched objects' keypoints count as misses
        scores, labels, coordinates = _detections(self.task, prediction)
        for b in range(len(targets)):
            self._add_image(targets, b, scale, scores[b], labels[b], coordinates[b])

    def _add_image(
        self,
        targets: ObjectTargets,
        b: int,
        scale: Tensor,
        scores: Tensor,
        labels: Tensor,
        coordinates: Tensor,
    ) -> None:
        image_id = len(self.images) + 1
        width, height = scale.tolist()
        self.images.append({"id": image_id, "width": width, "height": height})
        boxes = _xyxy(targets.boxes[b].float()) * scale.repeat(2)
        for box, label, points in zip(
            boxes.tolist(), targets.classes[b].tolist(), targets.keypoints[b], strict=True
        ):
            pixels = torch.cat([points[:, :2] * scale, points[:, 2:]], dim=1)
            w, h = box[2] - box[0], box[3] - box[1]
            self.truth.append(
                {
                    "id": len(self.truth) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "iscrowd": 0,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "keypoints": pixels.flatten().tolist(),
                    "num_keypoints": int((points[:, 2] > 0).sum()),
                }
            )
        points = torch.cat(
            [
                coordinates.view(-1, self.task.num_keypoints, 2) * scale,
                torch.ones(len(coordinates), self.task.num_keypoints, 1),
            ],
            dim=-1,
        )
        for score, label, keypoints in zip(scores.tolist(), labels.tolist(), points, strict=True):
            self.detections.append(
                {
                    "image_id": image_id,
                    "category_id": label + 1,
                    "score": score,
                    "keypoints": keypoints.flatten().tolist(),
                }
            )

    def compute(self) -> dict[str, float]:
        ap, ap_50 = self._oks_ap()
        pck = self.correct / self.labelled if self.labelled else float("nan")
        return {"pck": pck, "oks_ap": ap, "oks_ap_50": ap_50}

    def _oks_ap(self) -> tuple[float, float]:
        """COCO keypoint AP@[.5:.95] and AP@0.5 (OKS); NaN without labelled keypoints."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if not any(t["num_keypoints"] for t in self.truth) or not self.detections:
            return float("nan"), float("nan")
        names = [str(i) for i in range(self.task.num_keypoints)]
        categories = [
            {"id": c + 1, "name": str(c), "keypoints": names, "skeleton": []}
            for c in range(self.task.num_classes)
        ]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            truth = COCO()
            truth.dataset = {"images": self.images, "annotations": self.truth, "categories": categories}
            truth.createIndex()
            evaluation = COCOeval(truth, truth.loadRes(self.detections), iouType="keypoints")
            evaluation.params.kpt_oks_sigmas = self.task.oks_sigmas
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return _or_nan(float(evaluation.stats[0])), _or_nan(float(evaluation.stats[1]))


def _or_nan(value: float) -> float:
    """COCO's -1 ("no ground truth to score") as NaN."""
    return value if value >= 0 else float("nan")
