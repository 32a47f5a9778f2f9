"""The multi-decoder transformer (``task_queries``) with the set tasks, detection and keypoints: the
architecture contracts (the dense tasks' are in test_architectures.py), the generic block, and the
Sketch 2 config training end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dualhead.backbones.config import VisionConfig
from dualhead.core.trainer import Trainer
from dualhead.dense.config import DenseModelConfig, QueryDecoderConfig
from dualhead.dense.detection import DetectionTask, KeypointTask
from dualhead.dense.models import DenseModel, build_dense_model
from dualhead.dense.query_models import QueryMapHead
from dualhead.dense.tasks import HeadSpec
from dualhead.mtl.architectures import SetHead, TaskQueryDecoders, sine_position_encoding
from tests.dense.conftest import assert_a_dozen_steps_lower_every_loss, tiny_dense_config
from tests.dense.test_models import TINY

C, K = 5, 6
QUERIES = QueryDecoderConfig(num_queries=7, dim=16, heads=2, layers=1, feedforward=32)
SET_HEADS = {"detection": DetectionTask(C).head(), "keypoints": KeypointTask(C, K).head()}
TASKS = list(SET_HEADS)


def tiny_model(backbone: VisionConfig = TINY, **changes) -> DenseModel:
    changes.setdefault("queries", QUERIES)
    config = DenseModelConfig(backbone=backbone, architecture="task_queries", head_dim=8, **changes)
    return build_dense_model(config, SET_HEADS)


def owner(model: DenseModel) -> dict[int, str]:
    found = {id(p): "shared" for p in model.shared_parameters()}
    for task in TASKS:
        for module in model.task_modules(task):
            found.update({id(p): task for p in module.parameters()})
    return found


def test_set_predictions_and_declared_sharing():
    model = tiny_model().eval()
    output = model(torch.randn(2, 3, 32, 48))
    assert {k: tuple(v.shape) for k, v in output.predictions.items()} == {
        "detection": (2, 7, C + 1 + 4),
        "keypoints": (2, 7, C + 1 + 2 * K),
    }
    for prediction in output.predictions.values():
        assert (
            (prediction[..., C + 1 :] >= 0) & (prediction[..., C + 1 :] <= 1)
        ).all()  # coordinates in [0, 1]
    assert output.shared["features"].shape == (
        2,
        1 * 2,
        16,
    )  # the stride-32 map of a 32 x 48 image, as tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(v.dtype == torch.float32 for v in model(torch.randn(1, 3, 32, 32)).predictions.values())
    role = owner(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(id(p) in role for p in trainable)  # everything is shared or one task's: nothing soft
    assert sum(p.numel() for p in model.backbone.parameters()) + model.projection.weight.numel() + 16 == sum(
        p.numel() for p in trainable if role[id(p)] == "shared"
    )
    for task in TASKS:
        assert model.decoders.tasks[task].queries in model.task_modules(task)[0].modules()


def test_gradients_reach_what_should_train_and_nothing_else():
    model = tiny_model().train()
    output = model(torch.randn(2, 3, 32, 32))
    role = owner(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for task in TASKS:
        grads = torch.autograd.grad(
            output.predictions[task].square().mean(), params, retain_graph=True, allow_unused=True
        )
        for p, g in zip(params, grads, strict=True):
            reached = g is not None and bool(g.abs().sum() > 0)
            if role[id(p)] not in (task, "shared"):
                assert not reached, f"{task}'s loss reaches {role[id(p)]}'s parameters"
        assert any(
            g is not None and g.abs().sum() > 0
            for p, g in zip(params, grads, strict=True)
            if role[id(p)] == "shared"
        )
        own = [g for p, g in zip(params, grads, strict=True) if role[id(p)] == task]
        assert own and all(g is not None for g in own)


def test_save_and_load_give_identical_outputs(tmp_path):
    model = tiny_model()
    model.train()
    model(torch.randn(4, 3, 32, 32))
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["heads"]["keypoints"] == {
        "channels": C + 1,
        "activation": "identity",
        "bias": 0.0,
        "kind": "set",
        "coordinates": 2 * K,
    }
    loaded = DenseModel.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config == model.config and loaded.head_specs == SET_HEADS
    images = torch.randn(2, 3, 32, 32)
    for task in TASKS:
        torch.testing.assert_close(loaded(images).predictions[task], model(images).predictions[task])


def test_options_are_checked_with_clear_errors():
    with pytest.raises(
        ValueError, match="model.queries: the decoder dimension 20 must be divisible by its 8"
    ):
        tiny_model(queries=dataclasses.replace(QUERIES, dim=20, heads=8))
    with pytest.raises(ValueError, match="model.queries.dim must be divisible by 4"):
        tiny_model(queries=dataclasses.replace(QUERIES, dim=18, heads=2))
    with pytest.raises(ValueError, match="model.queries: a query decoder needs at least one query"):
        tiny_model(queries=dataclasses.replace(QUERIES, num_queries=0))


def test_generic_blocks():
    code = sine_position_encoding(3, 4, 8)
    assert (
        code.shape == (12, 8) and len({tuple(row.tolist()) for row in code}) == 12
    )  # every position differs
    torch.testing.assert_close(code[1, 4:], code[5, 4:])  # the same column, the same column half
    decoders = TaskQueryDecoders(16, {"a": 3, "b": 5}, layers=1, heads=2, feedforward=32)
    out = decoders(torch.randn(2, 9, 16))
    assert out["a"].shape == (2, 3, 16) and out["b"].shape == (2, 5, 16)
    head = SetHead(16, 4, 6)
    assert head(out["b"]).shape == (2, 5, 10)
    dense = QueryMapHead(16, 8, HeadSpec(1, "softplus", bias=2.0))
    assert (dense(torch.randn(2, 16, 3, 3), torch.randn(2, 1, 16), (12, 12)) > 0).all()


@pytest.fixture
def trainer_for(scenes_cache, tmp_path):
    def build(balancer: str = "pcgrad", **changes) -> Trainer:
        config = tiny_dense_config(scenes_cache, tmp_path, tasks=["detection", "keypoints"], max_objects=4)
        config.model.architecture = "task_queries"
        config.model.queries = dataclasses.replace(QUERIES, num_queries=5)
        for key, value in changes.items():
            setattr(config.model, key, value)
        config.train.balancer = balancer
        config.train.lr = config.train.encoder_lr = 1e-2
        config.train.max_steps = 12
        return Trainer(config, tmp_path / "run")

    return build


def test_gradient_method_and_a_task_absent_from_the_batch(trainer_for):
    trainer = trainer_for("pcgrad")
    batch = next(iter(trainer.experiment.train_loader()))
    model = trainer.model
    result = trainer.train_step(batch)
    assert set(result.report.weights) == set(TASKS) and "cosine/detection~keypoints" in result.diagnostics
    absent = dataclasses.replace(batch, keypoints=None)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = trainer.train_step(absent)
    assert set(result.losses) == {"detection"}
    role = owner(model)
    for name, p in model.named_parameters():
        if role.get(id(p)) == "keypoints":
            assert torch.equal(before[name], p), name
    assert any(
        not torch.equal(before[n], p) for n, p in model.named_parameters() if role.get(id(p)) == "detection"
    )
    assert any(
        not torch.equal(before[n], p) for n, p in model.named_parameters() if role.get(id(p)) == "shared"
    )


def test_trains_on_tiny_scenes(trainer_for):
    assert_a_dozen_steps_lower_every_loss(trainer_for("fixed"), TASKS)


def test_sketch2_config_trains_end_to_end(scenes_cache, tmp_path):
    """The bundled ViT + two query decoders config, shrunk: a run writes mAP, PCK and OKS AP."""
    from dualhead.core.config import load_config

    config = load_config(
        "scenes_vit_queries",
        [
            f"data.root={scenes_cache}",
            "data.train_size=16",
            "data.val_size=8",
            "data.test_size=8",
            "data.batch_size=8",
            "train.epochs=1",
            "train.progress=false",
            f"output_dir={tmp_path}",
            "name=run",
            "model.backbone.timm_options.depth=1",
            "model.queries.layers=1",
        ],
    )
    trainer = Trainer(config, tmp_path / "run")
    assert type(trainer.model.backbone.model).__name__ == "FeatureGetterNet"  # the ViT's tokens as a map
    assert trainer.model.backbone.reductions == [8]
    trainer.fit()
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    text = json.dumps(metrics)
    for key in ("detection/map", "detection/map_50", "keypoints/pck", "keypoints/oks_ap"):
        assert key in text
    assert "detection/map_50" in (tmp_path / "run" / "results.md").read_text()
