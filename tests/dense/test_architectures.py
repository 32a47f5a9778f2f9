"""Contracts every registered dense architecture keeps: outputs, declared sharing, gradients, saving,
gradient methods, partial labels, and training on tiny scenes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dualhead.backbones.features import backbone_data_config
from dualhead.core.trainer import Trainer
from dualhead.dense.config import AdapterConfig, DenseModelConfig, QueryDecoderConfig
from dualhead.dense.models import DENSE_ARCHITECTURES, DenseModel, build_dense_model
from tests.dense.conftest import assert_a_dozen_steps_lower_every_loss, tiny_dense_config
from tests.dense.test_models import HEADS, TINY
from tests.dense.test_models import tiny_model as _tiny_model

ARCHITECTURES = sorted(DENSE_ARCHITECTURES)
#: Options the contracts build an architecture with. The per-task adapter designs freeze their backbone
#: by default, and adapters and lora then share nothing trainable: the contracts train the backbone
#: (tests/dense/test_adapters.py covers them frozen).
CONTRACT_OPTIONS = {
    name: {"adapters": AdapterConfig(freeze_backbone=False)} for name in ("adapters", "lora", "adapters_shared_head")
} | {"task_queries": {"queries": QueryDecoderConfig(dim=16, heads=2, layers=1, feedforward=32)}}


def tiny_model(architecture: str, **changes) -> DenseModel:
    return _tiny_model(architecture, **{**CONTRACT_OPTIONS.get(architecture, {}), **changes})


def roles(model: DenseModel) -> dict[int, str]:
    """id(parameter) -> "shared", a task's name, or "soft" (neither: reached by every task's loss)."""
    found = {id(p): "shared" for p in model.shared_parameters()}
    for task in model.head_specs:
        for module in model.task_modules(task):
            for p in module.parameters():
                assert id(p) not in found, f"{task} claims a parameter already declared {found.get(id(p))}"
                found[id(p)] = task
    return {id(p): found.get(id(p), "soft") for p in model.parameters() if p.requires_grad}


def toy_losses(predictions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {task: (prediction.float() - 0.3).square().mean() for task, prediction in predictions.items()}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_task_is_predicted_at_the_input_size(architecture):
    model = tiny_model(architecture).eval()
    output = model(torch.randn(2, 3, 32, 48))
    assert {k: tuple(v.shape) for k, v in output.predictions.items()} == {
        "seg": (2, 6, 32, 48),
        "depth": (2, 1, 32, 48),
        "normals": (2, 3, 32, 48),
    }
    assert (output.predictions["depth"] > 0).all()
    assert all(torch.isfinite(v).all() for v in output.predictions.values())
    assert output.shared[model.representation_key].shape[0] == 2
    assert model.data_config == backbone_data_config(TINY)  # what the datasets normalise with
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(torch.randn(1, 3, 32, 32))
    assert all(v.dtype == torch.float32 for v in output.predictions.values())  # output layers in float32


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_declared_sharing_partitions_the_parameters(architecture):
    model = tiny_model(architecture)
    role = roles(model)
    shared = [p for p in model.parameters() if role.get(id(p)) == "shared"]
    assert shared and {id(p) for p in model.conflict_parameters()} <= {id(p) for p in shared}
    for task in HEADS:
        assert any(r == task for r in role.values()), f"{task} owns no parameter"
    soft = [p for p in model.parameters() if role.get(id(p)) == "soft"]
    # Soft-shared parameters (columns) exist only where no representation feeds every task.
    assert not soft or not model.representation_shared_by_tasks
    assert model.pretrained_modules() == []  # random init: everything trains at the full rate
    pretrained = build_dense_model(
        DenseModelConfig(architecture=architecture, fpn_dim=8, head_dim=8, **CONTRACT_OPTIONS.get(architecture, {})), {"seg": HEADS["seg"]}
    )
    groups = dict((id(p), group) for group, p in pretrained.parameter_groups())
    backbone = {id(p) for module in pretrained.pretrained_modules() for p in module.parameters()}
    assert backbone and all(groups[i] == "pretrained" for i in backbone)
    assert all(groups[id(p)] == "new" for p in pretrained.heads.parameters())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_gradients_reach_what_should_train_and_nothing_else(architecture):
    model = tiny_model(architecture).train()
    output = model(torch.randn(2, 3, 32, 32))
    role = roles(model)
    params = [p for p in model.parameters() if p.requires_grad]
    features = output.shared[model.representation_key]
    losses = toy_losses(output.predictions)
    at_features = {}
    for task, loss in losses.items():
        grads = torch.autograd.grad(loss, [*params, features], retain_graph=True, allow_unused=True)
        at_features[task] = grads[-1]
        moved = {r: False for r in set(role.values())}
        for p, g in zip(params, grads[:-1], strict=True):
            nonzero = g is not None and bool(g.abs().sum() > 0)
            moved[role[id(p)]] |= nonzero
            if role[id(p)] in HEADS and role[id(p)] != task:
                assert not nonzero, f"{task}'s loss reaches {role[id(p)]}'s own parameters"
            if role[id(p)] == task:
                assert g is not None, f"{task}'s loss misses one of its own parameters"
        assert moved[task] and moved["shared"], f"{task}'s loss reaches {moved}"
        if "soft" in moved:
            assert moved["soft"]  # the columns: every task's loss reaches them through the mixing
    # Every trainable parameter learns from the summed loss.
    grads = torch.autograd.grad(sum(losses.values()), params, retain_graph=True, allow_unused=True)
    assert all(g is not None for g in grads)
    # The declared representation: shared by every task (its gradients overlap) or, where declared
    # not shared, each task's gradient on its own entries.
    overlap = (at_features["seg"].abs() > 0) & (at_features["depth"].abs() > 0)
    assert bool(overlap.any()) == model.representation_shared_by_tasks
    # Everything before the representation reaches the tasks only through it, so a gradient method
    # acting there sees the whole gradient (backpropagating its gradient gives the direct one).
    upstream = [
        p
        for p, g in zip(
            params,
            torch.autograd.grad(features.float().sum(), params, retain_graph=True, allow_unused=True),
            strict=True,
        )
        if g is not None
    ]
    assert upstream
    direct = torch.autograd.grad(losses["depth"], upstream, retain_graph=True)
    through = torch.autograd.grad(features, upstream, grad_outputs=at_features["depth"], retain_graph=True)
    for a, b in zip(direct, through, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_and_load_give_identical_outputs(architecture, tmp_path):
    model = tiny_model(architecture, task_levels={"depth": [2, 3]}, stitch_self_weight=0.8)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # moves the batch-norm statistics off their initial values
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    loaded = DenseModel.from_pretrained(tmp_path / "saved").eval()
    assert type(loaded) is type(model) and loaded.config == model.config and loaded.head_specs == HEADS
    images = torch.randn(2, 3, 32, 32)
    expected, got = model(images).predictions, loaded(images).predictions
    for task in HEADS:
        torch.testing.assert_close(got[task], expected[task])


@pytest.fixture
def trainer_for(scenes_cache, tmp_path):
    def build(architecture: str, balancer: str = "pcgrad", **options) -> Trainer:
        config = tiny_dense_config(scenes_cache, tmp_path)
        config.model.architecture = architecture
        for key, value in CONTRACT_OPTIONS.get(architecture, {}).items():
            setattr(config.model, key, value)
        config.train.balancer = balancer
        config.train.balancer_options = options
        config.train.lr = config.train.encoder_lr = 1e-2
        config.train.max_steps = 12
        return Trainer(config, tmp_path / architecture)

    return build


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_gradient_method_and_a_task_absent_from_the_batch(architecture, trainer_for):
    trainer = trainer_for(architecture, "pcgrad")  # acts on the declared shared parameters
    batch = next(iter(trainer.experiment.train_loader()))
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = trainer.train_step(batch)
    assert set(result.report.weights) == set(HEADS)
    assert {"cosine/seg~depth", "grad_norm/normals"} <= set(result.diagnostics)
    shared = {id(p) for p in model.shared_parameters()}
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if id(p) in shared)
    # No normals labels in this batch: its own parameters stay as they are, the others train.
    absent = dataclasses.replace(batch, normals=None)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = trainer.train_step(absent)
    assert set(result.losses) == {"seg", "depth"}
    own = {id(p): task for task in HEADS for module in model.task_modules(task) for p in module.parameters()}
    for name, p in model.named_parameters():
        if own.get(id(p)) == "normals":
            assert torch.equal(before[name], p), name
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if own.get(id(p)) == "seg")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_representation_mode_follows_the_declaration(architecture, trainer_for):
    """Gradient methods may act on the representation only where every task reads it."""
    model = tiny_model(architecture)
    if not model.representation_shared_by_tasks:
        with pytest.raises(ValueError, match="representation mode cannot act on this model"):
            trainer_for(architecture, "upgrad", mode="representation")
        return
    trainer = trainer_for(architecture, "upgrad", mode="representation")
    batch = next(iter(trainer.experiment.train_loader()))
    before = [p.detach().clone() for p in trainer.model.shared_parameters()]
    result = trainer.train_step(batch)
    assert set(result.report.weights) == set(HEADS)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.shared_parameters(), strict=True))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trains_on_tiny_scenes(architecture, trainer_for):
    """A dozen steps on one batch of scenes bring every task's loss down."""
    assert_a_dozen_steps_lower_every_loss(trainer_for(architecture, "fixed"), HEADS)



def test_architecture_options_are_checked_with_clear_errors():
    from dualhead.core.config import load_config

    config = load_config("scenes", ["model.architecture=multitask_fpn", "model.task_levels.depth=[2,3]"])
    assert config.model.task_levels == {"depth": [2, 3]}
    model = tiny_model("multitask_fpn", task_levels={"depth": [3, 2]})
    assert model.pyramid.tasks["depth"].levels == [2, 3] and model.pyramid.tasks["seg"].levels == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"model.task_levels names unknown tasks \['dpeth'\]"):
        tiny_model("multitask_fpn", task_levels={"dpeth": [2]})
    with pytest.raises(
        ValueError,
        match=r"model.task_levels: the pyramid levels of task 'depth' must be distinct positions in 0..3",
    ):
        tiny_model("multitask_fpn", task_levels={"depth": [4]})
    with pytest.raises(ValueError, match=r"model.stitch_self_weight must be in \[0, 1\], got 1.2"):
        tiny_model("cross_stitch", stitch_self_weight=1.2)
    with pytest.raises(
        ValueError, match="model.sluice_subspaces: sluice subspaces must divide every level's channels"
    ):
        tiny_model("sluice", sluice_subspaces=3)  # 3 does not divide 8
    vit = dataclasses.replace(TINY, name="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="cannot run FeatureGetterNet level by level"):
        build_dense_model(
            DenseModelConfig(backbone=vit, architecture="cross_stitch", out_indices=[1, 2]), HEADS
        )


def test_sluice_orthogonality_penalty_is_the_auxiliary_loss_and_trains_the_columns(trainer_for):
    trainer = trainer_for("sluice")
    trainer.config.model.sluice_orthogonality = 0.5
    trainer.model.config.sluice_orthogonality = 0.5
    trainer.experiment.on_epoch_start(0)
    result = trainer.train_step(next(iter(trainer.experiment.train_loader())))
    assert result.losses["aux"] > 0  # the penalty reached the Trainer, outside the balancing
    plain = tiny_model("sluice")
    assert plain(torch.randn(2, 3, 32, 32)).auxiliary_loss is None  # off by default
    model = tiny_model("sluice", sluice_orthogonality=0.5)
    images = torch.randn(2, 3, 32, 32)
    output = model(images)
    expected = 0.5 * model.network.orthogonality(model.network(images))
    torch.testing.assert_close(output.auxiliary_loss, expected)
    output.auxiliary_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.network.columns.parameters())
    with pytest.raises(ValueError, match="model.sluice_orthogonality must be >= 0"):
        tiny_model("sluice", sluice_orthogonality=-1.0)
