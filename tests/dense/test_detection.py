"""Object tasks: scenes batches carry each image's objects, Hungarian matching, DETR-style losses,
box mAP (torchmetrics), PCK@0.1 and OKS AP (pycocotools)."""

from __future__ import annotations

import math

import pytest
import torch

from dualhead.dense.config import DenseDataConfig
from dualhead.dense.data import DenseBatch, load_dense_splits
from dualhead.dense.detection import DetectionTask, KeypointTask, ObjectTargets, hungarian_match
from dualhead.dense.models import build_dense_model
from dualhead.dense.scenes import CLASS_NAMES
from tests.dense.conftest import DATA_CONFIG
from tests.dense.test_models import TINY

C, K, Q = 5, 6, 8  # object classes, keypoints per object, queries
BIG = 50.0  # a logit margin that makes cross-entropy vanish


def scenes(cache, tasks, size=32, count=8):
    config = DenseDataConfig(root=str(cache), image_size=size, train_size=count, val_size=0, test_size=0)
    return load_dense_splits(config, tasks, DATA_CONFIG)["train"]


def random_targets(counts, seed=0) -> ObjectTargets:
    """Objects with boxes inside the image and keypoints, the last keypoint of each unlabelled."""
    g = torch.Generator().manual_seed(seed)
    classes, boxes, keypoints = [], [], []
    for n in counts:
        classes.append(torch.randint(0, C, (n,), generator=g))
        centre, half = 0.25 + 0.5 * torch.rand(n, 2, generator=g), 0.05 + 0.15 * torch.rand(n, 2, generator=g)
        boxes.append(torch.cat([centre, 2 * half], dim=1))
        points = torch.cat([torch.rand(n, K, 2, generator=g), torch.full((n, K, 1), 2.0)], dim=-1)
        points[:, -1] = 0  # padding: a class with fewer keypoints
        keypoints.append(points)
    return ObjectTargets(classes, boxes, keypoints)


def perfect(targets: ObjectTargets, task, order=None) -> torch.Tensor:
    """Predictions that put image b's objects on queries `order[b]` and "no object" on the others."""
    coordinates = task.coordinates
    out = torch.zeros(len(targets), Q, C + 1 + coordinates)
    out[..., C] = BIG  # no object
    out[..., C + 1 :] = 0.5
    for b, classes in enumerate(targets.classes):
        queries = order[b] if order is not None else torch.arange(len(classes))
        out[b, queries, C] = 0
        out[b, queries, classes] = BIG
        values = (
            targets.boxes[b] if isinstance(task, DetectionTask) else targets.keypoints[b][..., :2].flatten(1)
        )
        out[b, queries, C + 1 :] = values
    return out


def batch_of(targets: ObjectTargets, size=64) -> DenseBatch:
    return DenseBatch(images=torch.zeros(len(targets), 3, size, size), detection=targets, keypoints=targets)


def test_scenes_batches_carry_their_objects(scenes_cache):
    dataset = scenes(scenes_cache, ["detection", "keypoints"])
    batch = dataset.__getitems__([0, 1, 2])
    assert batch.seg is None and batch.depth is None and batch.normals is None
    assert batch.detection is batch.keypoints and len(batch.detection) == 3
    for b, scene in enumerate(dataset.scenes.objects[:3]):
        objects = scene["objects"]
        assert batch.detection.classes[b].tolist() == [obj["class"] - 1 for obj in objects]
        x0, y0, x1, y1 = objects[0]["box"]
        torch.testing.assert_close(
            batch.detection.boxes[b][0], torch.tensor([x0 + x1, y0 + y1, 2 * (x1 - x0), 2 * (y1 - y0)]) / 64
        )
        points = batch.keypoints.keypoints[b]
        assert points.shape == (len(objects), K, 3)
        for k, obj in enumerate(objects):
            count = len(obj["keypoints"])  # the centre and the class's corners; the rest is padding
            assert count == {"sphere": 5, "box": 5, "pyramid": 4, "ring": 5, "star": 6}[obj["name"]]
            assert (points[k, count:, 2] == 0).all()
            torch.testing.assert_close(points[k, 0, :2], torch.tensor(obj["keypoints"][0][:2]) / 32)
    moved = batch.to("cpu")
    assert isinstance(moved.detection, ObjectTargets) and moved.detection.classes[0].dtype == torch.int64
    # Only the object task asked for is labelled; the per-pixel tasks stay as they were.
    only = scenes(scenes_cache, ["seg", "keypoints"]).__getitems__([0])
    assert only.detection is None and only.keypoints is not None and only.seg.shape == (1, 32, 32)
    assert dataset.num_object_classes == len(CLASS_NAMES) - 1 == C and dataset.max_keypoints == K


def test_object_tasks_are_opt_in_and_checked(scenes_cache):
    from dualhead.core.config import load_config
    from dualhead.dense.application import build_experiment

    config = load_config("scenes", [])
    assert config.data.tasks is None  # seg, depth, normals by default
    with pytest.raises(ValueError, match=r"format 'cityscapes' has no labels for \['detection'\]"):
        load_dense_splits(
            DenseDataConfig(format="cityscapes", root=str(scenes_cache)), ["detection"], DATA_CONFIG
        )
    with pytest.raises(
        ValueError, match="predicts maps, not the sets that \\['detection'\\] need; use task_queries"
    ):
        build_dense_model(config.model.__class__(backbone=TINY), {"detection": DetectionTask(C).head()})
    config = load_config("scenes_vit_queries", [f"data.root={scenes_cache}", "data.image_size=32"])
    assert config.data.tasks == ["detection", "keypoints"] and config.model.architecture == "task_queries"
    splits = {"train": scenes(scenes_cache, ["detection", "keypoints"])}
    config.model.backbone.image_size = 32
    experiment = build_experiment(config, splits)
    assert [task.head().channels for task in experiment.tasks.values()] == [C + 1, C + 1]
    assert experiment.tasks["keypoints"].num_keypoints == K


def test_matching_recovers_a_permuted_set():
    task = DetectionTask(C)
    targets = random_targets([5])
    order = torch.randperm(Q, generator=torch.Generator().manual_seed(1))[:5]
    prediction = perfect(targets, task, [order])
    ((queries, objects),) = task.match(prediction, targets)
    assert dict(zip(objects.tolist(), queries.tolist(), strict=True)) == dict(enumerate(order.tolist()))
    # On the right pairs the box cost is its minimum: no L1 distance and a GIoU of one.
    cost = task.coordinate_cost(prediction[0, order, C + 1 :], targets, 0)
    torch.testing.assert_close(cost.diagonal(), torch.full((5,), -task.giou_weight))
    keypoint_task = KeypointTask(C, K)
    ((queries, objects),) = keypoint_task.match(perfect(targets, keypoint_task, [order]), targets)
    assert dict(zip(objects.tolist(), queries.tolist(), strict=True)) == dict(enumerate(order.tolist()))
    rows, cols = hungarian_match(torch.tensor([[3.0, 1.0], [0.0, 5.0], [2.0, 2.0]]))
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]  # three queries, two objects


@pytest.mark.parametrize("task", [DetectionTask(C), KeypointTask(C, K)], ids=["detection", "keypoints"])
def test_losses_vanish_for_perfect_predictions(task):
    targets = random_targets([3, 0, 5])  # the empty image: every query says "no object"
    order = [torch.tensor([7, 2, 4]), torch.tensor([], dtype=torch.int64), torch.tensor([0, 1, 3, 5, 6])]
    batch = batch_of(targets)
    assert float(task.loss(perfect(targets, task, order), batch)) < 1e-5
    assert task.loss_count(batch) == 3
    wrong = perfect(targets, task, order)
    wrong[..., C + 1 :] = (wrong[..., C + 1 :] + 0.1).clamp(max=1)
    wrong.requires_grad_(True)
    loss = task.loss(wrong, batch)
    assert float(loss.detach()) > 0.1
    loss.backward()
    assert (
        wrong.grad[0, 7, C + 1 :].abs().sum() > 0 and wrong.grad[0, 1, C + 1 :].abs().sum() == 0
    )  # unmatched
    assert task.loss(wrong, DenseBatch(images=batch.images)) is None  # no labels: no loss
    with pytest.raises(
        ValueError, match=rf"{task.name}: expected a \[batch, queries, {C + 1 + task.coordinates}\]"
    ):
        task.loss(wrong[..., :-1], batch)


def test_no_object_is_down_weighted():
    task = DetectionTask(C, no_object_weight=0.1)
    targets = random_targets([1])
    prediction = perfect(targets, task)
    prediction[0, 1:, C] = 0  # unmatched queries unsure between classes and no object
    down = float(task.loss(prediction, batch_of(targets)))
    full = float(DetectionTask(C, no_object_weight=1.0).loss(prediction, batch_of(targets)))
    assert 0 < down < full


def test_metrics_of_perfect_predictions_are_one():
    targets = random_targets([3, 5, 2])
    detection, keypoints = DetectionTask(C), KeypointTask(C, K)
    order = [torch.tensor([4, 0, 6]), torch.arange(5), torch.tensor([7, 3])]
    meter = detection.meter()
    meter.update(perfect(targets, detection, order), batch_of(targets))
    assert meter.compute() == {"map": 1.0, "map_50": 1.0, "map_75": 1.0}
    meter = keypoints.meter()
    meter.update(perfect(targets, keypoints, order), batch_of(targets))
    result = meter.compute()
    assert (
        result["pck"] == 1.0
        and result["oks_ap"] == pytest.approx(1.0)
        and result["oks_ap_50"] == pytest.approx(1.0)
    )


def test_pck_counts_keypoints_within_a_tenth_of_the_box():
    keypoints = KeypointTask(C, K)
    targets = random_targets([1])
    targets.boxes[0][:] = torch.tensor([0.5, 0.5, 0.25, 0.5])  # 16 x 32 px in a 64 px image: threshold 3.2 px
    targets.keypoints[0][0, :, :2] = 0.5
    prediction = perfect(targets, keypoints)
    offsets = torch.tensor([0.0, 3.0, 3.1, 3.3, 10.0, 0.0]) / 64  # pixels; the last is padding
    prediction[0, 0, C + 1 :: 2] += offsets
    meter = keypoints.meter()
    meter.update(prediction, batch_of(targets))
    result = meter.compute()
    assert result["pck"] == pytest.approx(3 / 5)  # 0, 3 and 3.1 px are within 3.2 px; padding is not counted
    assert 0 < result["oks_ap"] < 1
    for task in (keypoints, DetectionTask(C)):  # nothing seen: NaN, not zero, as the other dense meters
        assert all(math.isnan(value) for value in task.meter().compute().values())
