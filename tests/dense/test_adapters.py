"""Per-task adapters, LoRA and Sketch 3's task-conditioned shared head (`dualhead.dense.adapter_models`)
beyond the contracts of test_architectures.py: what is hooked where, the frozen backbone, adding a
task to a trained model, a Swin backbone, and the bundled Sketch 3 config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dualhead.backbones.config import VisionConfig
from dualhead.backbones.features import build_feature_backbone
from dualhead.core.config import load_config
from dualhead.core.trainer import Trainer
from dualhead.dense.adapter_models import saved_model_directory
from dualhead.dense.config import AdapterConfig, DenseModelConfig
from dualhead.dense.models import DenseModel, build_dense_model
from dualhead.dense.tasks import HeadSpec
from dualhead.mtl.architectures import BottleneckAdapter, LoRADelta, backbone_blocks, linear_layers
from tests.dense.conftest import tiny_dense_config
from tests.dense.test_models import HEADS, TINY

# timm's Swin-T layout at 32 px, shrunk: 4 stages of one block, 8x8 tokens at stride 4.
TINY_SWIN = VisionConfig(
    name="swin_tiny_patch4_window7_224",
    weights="none",
    image_size=32,
    norm_eval=False,
    timm_options={"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 2},
)
SWIN_LEVELS = [0, 1, 2, 3]


def build(architecture: str, backbone: VisionConfig = TINY, heads=HEADS, **adapters) -> DenseModel:
    out_indices = SWIN_LEVELS if backbone is TINY_SWIN else [1, 2, 3, 4]
    config = DenseModelConfig(
        backbone=backbone,
        architecture=architecture,
        out_indices=out_indices,
        fpn_dim=16,
        head_dim=8,
        adapters=AdapterConfig(**adapters),
    )
    return build_dense_model(config, heads)


def levels_with(model: DenseModel, task: str | None, images: torch.Tensor) -> list[torch.Tensor]:
    with model.task_hooks.use(task):
        return model.backbone(images)


@pytest.mark.parametrize("backbone", [TINY, TINY_SWIN], ids=["mobilenetv3", "swin"])
@pytest.mark.parametrize("architecture", ["adapters", "lora"])
def test_task_modules_start_as_the_backbone_and_each_task_runs_its_own(architecture, backbone):
    model = build(architecture, backbone).eval()
    # hooks, not wrappers: the backbone keeps timm's names (its weights load as usual) and its parameters
    assert set(model.backbone.state_dict()) == set(build_feature_backbone(backbone, model.config.out_indices).state_dict())
    assert not any(name.startswith("task_hooks") for name, _ in model.backbone.named_parameters())
    layers = backbone_blocks(model.backbone.model) if architecture == "adapters" else linear_layers(model.backbone.model)
    assert model.task_hooks.layer_names == [name for name, _ in layers]
    if architecture == "adapters" and backbone is TINY_SWIN:
        assert model.task_hooks.layer_names == [f"layers_{i}.blocks.0" for i in range(4)]
        assert all(adapter.channel_dim == 3 for adapter in model.task_hooks.tasks["seg"])  # NHWC stages
    images = torch.randn(2, 3, 32, 32)
    plain = levels_with(model, None, images)
    assert [tuple(x.shape[1:2]) for x in plain] == [(c,) for c in model.backbone.channels]  # NCHW levels
    for task in HEADS:  # zero-initialised up-projection / LoRA B: every task starts as the backbone
        for a, b in zip(levels_with(model, task, images), plain, strict=True):
            torch.testing.assert_close(a, b)
    with torch.no_grad():
        for module in model.task_hooks.tasks["seg"].modules():
            if isinstance(module, BottleneckAdapter):
                module.up.weight.normal_()
            elif isinstance(module, LoRADelta):
                module.B.normal_()
    assert not torch.allclose(levels_with(model, "seg", images)[-1], plain[-1])
    for a, b in zip(levels_with(model, "depth", images), plain, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="no modules for task 'edges'"):
        levels_with(model, "edges", images)


def test_lora_adds_the_low_rank_update_to_linear_layers_and_pointwise_convs():
    model = build("lora", rank=2, alpha=6.0).eval()
    layers = dict(linear_layers(model.backbone.model))
    assert all(
        isinstance(m, torch.nn.Linear) or (m.kernel_size == (1, 1) and m.groups == 1) for m in layers.values()
    )
    index, (name, conv) = next(
        (i, item) for i, item in enumerate(layers.items()) if isinstance(item[1], torch.nn.Conv2d) and item[1].stride == (1, 1)
    )
    delta = model.task_hooks.tasks["depth"][index]
    with torch.no_grad():
        delta.B.normal_()
    assert delta.scale == 3.0 and delta.A.shape[0] == 2
    x = torch.randn(2, conv.in_channels, 5, 5)
    merged = conv.weight + delta.scale * (delta.B @ delta.A)[:, :, None, None]
    with model.task_hooks.use("depth"):
        got = conv(x)
    torch.testing.assert_close(got, F.conv2d(x, merged, conv.bias), rtol=1e-4, atol=1e-5)
    swin = build("lora", TINY_SWIN, rank=3)
    qkv = dict(linear_layers(swin.backbone.model))["layers_0.blocks.0.attn.qkv"]
    assert isinstance(qkv, torch.nn.Linear)
    with pytest.raises(ValueError, match="model.adapters.rank must be >= 1 and alpha > 0, got 0 and 8.0"):
        build("lora", rank=0)
    with pytest.raises(ValueError, match="model.adapters.reduction must be >= 1, got 0"):
        build("adapters", reduction=0)


@pytest.mark.parametrize("architecture", ["adapters", "lora"])
def test_a_frozen_backbone_shares_nothing_so_gradient_methods_refuse(architecture, scenes_cache, tmp_path):
    config = tiny_dense_config(scenes_cache, tmp_path)
    config.model.architecture = architecture  # model.adapters.freeze_backbone: true by default
    config.train.diagnostics_every_steps = 1
    for method in ("pcgrad", "gradnorm", "db_mtl"):
        config.train.balancer = method
        with pytest.raises(ValueError, match=f"balancer '{method}' acts on .* this model shares none that train"):
            Trainer(config, tmp_path / method)
    config.train.balancer = "fixed"
    trainer = Trainer(config, tmp_path / "fixed")
    model = trainer.model
    assert model.shared_parameters() == [] and not any(p.requires_grad for p in model.backbone.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    own = {id(p) for task in HEADS for m in model.task_modules(task) for p in m.parameters()}
    assert trainable == own  # every trainable parameter is one task's
    before = {name: p.detach().clone() for name, p in model.backbone.state_dict().items()}
    batch = next(iter(trainer.experiment.train_loader()))
    result = trainer.train_step(batch)
    assert result.diagnostics == {}  # nothing shared: no gradient conflict to measure
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(before[name], tensor), name  # weights and batch-norm statistics


def test_shared_head_conditions_on_the_task_and_shares_projections_by_channel_count():
    heads = {"seg": HeadSpec(6), "depth": HeadSpec(1, "softplus", bias=2.0), "edges": HeadSpec(1)}
    model = build("adapters_shared_head", heads=heads)
    assert sorted(model.heads.projections) == ["1", "6"]
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.heads.film.generator.parameters()} <= shared  # frozen backbone, shared head
    assert not any(id(p) in shared for p in model.backbone.parameters())
    assert model.heads.projections["6"] in model.task_modules("seg")
    one_channel = model.heads.projections["1"]
    assert all(one_channel not in model.task_modules(task) for task in ("depth", "edges"))  # neither's own
    with torch.no_grad():
        for embedding in model.heads.film.embeddings.values():
            embedding.vector.normal_()
        model.heads.film.generator.weight.normal_()
    out = model.eval()(torch.randn(2, 3, 32, 32)).predictions
    assert (out["depth"] > 0).all() and not torch.allclose(F.softplus(out["edges"]), out["depth"])
    swin = build("adapters_shared_head", TINY_SWIN).eval()
    predictions = swin(torch.randn(2, 3, 32, 32)).predictions
    assert {k: tuple(v.shape) for k, v in predictions.items()} == {
        "seg": (2, 6, 32, 32),
        "depth": (2, 1, 32, 32),
        "normals": (2, 3, 32, 32),
    }


def test_adding_a_task_trains_only_its_modules(scenes_cache, tmp_path):
    first = tiny_dense_config(scenes_cache, tmp_path, tasks=["seg", "depth"])
    first.model.architecture = "adapters"
    first.model.adapters.freeze_backbone = False  # A and B train the backbone with their adapters
    first.train.lr = first.train.encoder_lr = 1e-2
    first.train.max_steps = 3
    Trainer(first, tmp_path / "ab").fit()
    trained = DenseModel.from_pretrained(saved_model_directory(tmp_path / "ab")).eval()

    second = tiny_dense_config(scenes_cache, tmp_path)  # seg, depth and the new normals
    second.model = dataclasses.replace(
        first.model, adapters=dataclasses.replace(first.model.adapters, init_from=str(tmp_path / "ab"))
    )
    second.train.lr = second.train.encoder_lr = 1e-2
    second.train.balancer = "pcgrad"  # nothing trainable is shared now
    with pytest.raises(ValueError, match="shares none that train"):
        Trainer(second, tmp_path / "abc")
    second.train.balancer = "fixed"
    trainer = Trainer(second, tmp_path / "abc")
    model = trainer.model
    new = {id(p) for m in model.task_modules("normals") for p in m.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == new
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    expected = trained(images).predictions
    for task in ("seg", "depth"):
        torch.testing.assert_close(model(images).predictions[task], expected[task])
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    batch = next(iter(trainer.experiment.train_loader()))
    model.train()
    for _ in range(3):
        trainer.train_step(batch)
    own = {name for name, t in model.state_dict(keep_vars=True).items() if id(t) in new}
    changed = {name for name, t in model.state_dict().items() if not torch.equal(before[name], t)}
    assert changed and changed <= own | {n for n in before if ".normals." in n}  # normals' BN statistics
    assert all(".normals." in name for name in changed)
    model.eval()
    for task in ("seg", "depth"):  # the trained tasks answer as before, batch-norm statistics included
        torch.testing.assert_close(model(images).predictions[task], expected[task])


def test_init_from_errors(scenes_cache, tmp_path):
    saved = build("adapters", heads={"seg": HEADS["seg"]})
    saved.save_pretrained(tmp_path / "seg_only")
    with pytest.raises(ValueError, match="the saved model's architecture is 'adapters', this model's 'lora'"):
        build("lora", init_from=str(tmp_path / "seg_only"))
    with pytest.raises(ValueError, match="nothing to add"):
        build("adapters", heads={"seg": HEADS["seg"]}, init_from=str(tmp_path / "seg_only"))
    with pytest.raises(ValueError, match="adapters .* differ"):
        build("adapters", reduction=2, init_from=str(tmp_path / "seg_only"))
    with pytest.raises(FileNotFoundError, match="neither a saved dense model nor a run directory"):
        build("adapters", init_from=str(tmp_path / "missing"))
    added = build("adapters", init_from=str(tmp_path / "seg_only"))
    assert not any(p.requires_grad for p in added.task_hooks.tasks["seg"].parameters())
    assert all(p.requires_grad for p in added.task_hooks.tasks["depth"].parameters())


def test_the_bundled_sketch3_config_trains_end_to_end(scenes_cache, tmp_path):
    config = load_config(
        "scenes_swin_adapters",
        [
            f"data.root={scenes_cache}",
            "data.train_size=8",
            "data.val_size=4",
            "data.test_size=4",
            "data.batch_size=4",
            "train.max_steps=2",
            "train.progress=false",
            "train.diagnostics_every_steps=1",
            f"output_dir={tmp_path}",
            "name=sketch3",
        ],
    )
    assert config.model.architecture == "adapters_shared_head"
    trainer = Trainer(config, tmp_path / "sketch3")
    assert trainer.model.backbone.model.__class__.__name__ == "FeatureListNet"
    assert len(trainer.model.task_hooks.layer_names) == 8  # two Swin blocks per stage, each adapted
    result = trainer.fit()
    assert result
    assert (tmp_path / "sketch3" / "best" / "model.safetensors").is_file()
    loaded = DenseModel.from_pretrained(tmp_path / "sketch3" / "best").eval()
    out = loaded(torch.randn(1, 3, 64, 64)).predictions
    assert all(torch.isfinite(v).all() for v in out.values())


def test_adapters_fit_every_block_of_the_default_pretrained_efficientnet_lite0():
    model = build_dense_model(DenseModelConfig(architecture="adapters"), {"seg": HEADS["seg"]})
    plain = build_feature_backbone(VisionConfig(name="efficientnet_lite0", weights="offline", norm_eval=False))
    assert len(model.task_hooks.layer_names) == 16  # Lite0's 1 + 2 + 2 + 3 + 3 + 4 + 1 blocks
    assert model.task_hooks.layer_names[:3] == ["blocks.0.0", "blocks.1.0", "blocks.1.1"]
    for name, tensor in plain.state_dict().items():  # the offline ImageNet weights, frozen
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor, rtol=0, atol=0)
    assert model.backbone.frozen and model.shared_parameters() == []
    assert [a.up.out_features for a in model.task_hooks.tasks["seg"]][:3] == [16, 24, 24]
