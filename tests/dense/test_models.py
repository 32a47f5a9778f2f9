"""The multi-scale backbone and the hard-sharing FPN model (the contracts every architecture keeps,
shapes, bf16 outputs, saving, gradients, are in test_architectures.py)."""

from __future__ import annotations

import pytest
import torch

from dualhead.backbones.config import VisionConfig
from dualhead.backbones.features import build_feature_backbone
from dualhead.backbones.vision import build_vision_encoder
from dualhead.dense.config import DenseModelConfig
from dualhead.dense.models import DENSE_ARCHITECTURES, DenseModel, HardSharingFPN, build_dense_model
from dualhead.dense.tasks import HeadSpec

TINY = VisionConfig(name="mobilenetv3_small_050", weights="none", norm_eval=False)
HEADS = {"seg": HeadSpec(6), "depth": HeadSpec(1, "softplus", bias=2.0), "normals": HeadSpec(3)}


def tiny_model(architecture: str = "hard_fpn", **changes) -> DenseModel:
    """A random-initialised tiny model of `architecture` with the three scenes heads."""
    config = DenseModelConfig(backbone=TINY, architecture=architecture, fpn_dim=16, head_dim=8, **changes)
    return build_dense_model(config, HEADS)


def test_offline_lite0_weights_load_into_the_feature_backbone():
    backbone = build_feature_backbone(VisionConfig())  # efficientnet_lite0, offline weights
    pooled = build_vision_encoder(VisionConfig())  # loads the same file by position
    features, reference = backbone.model.state_dict(), pooled.model.state_dict()
    for key in ("conv_stem.weight", "bn1.running_mean", "blocks.3.1.conv_dw.weight", "blocks.6.0.bn3.weight"):
        torch.testing.assert_close(features[key], reference[key], rtol=0, atol=0)
    assert backbone.channels == [24, 40, 112, 320] and backbone.reductions == [4, 8, 16, 32]
    assert backbone.data_config["mean"] == (0.5, 0.5, 0.5)
    random = build_feature_backbone(VisionConfig(weights="none"))
    assert not torch.equal(random.model.conv_stem.weight, backbone.model.conv_stem.weight)


def test_resnet50_builds_as_a_random_architecture():
    backbone = build_feature_backbone(VisionConfig(name="resnet50", weights="none"))
    assert backbone.channels == [256, 512, 1024, 2048] and backbone.reductions == [4, 8, 16, 32]
    assert backbone.data_config["std"] == (0.229, 0.224, 0.225)


def test_feature_backbone_errors():
    with pytest.raises(ValueError, match="no offline weights"):
        build_feature_backbone(VisionConfig(name="resnet50", weights="offline"))
    with pytest.raises(ValueError, match="out_indices"):
        build_feature_backbone(TINY, out_indices=(1, 9))


def test_norm_eval_and_freeze():
    backbone = build_feature_backbone(VisionConfig(name="mobilenetv3_small_050", weights="none", norm_eval=True))
    backbone.train()
    assert backbone.training and all(not m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen = build_feature_backbone(VisionConfig(name="mobilenetv3_small_050", weights="none", freeze=True))
    assert frozen.frozen and not any(p.requires_grad for p in frozen.parameters())


def test_fpn_features_are_the_finest_level():
    model = tiny_model().eval()
    output = model(torch.randn(2, 3, 32, 48))
    assert isinstance(model, HardSharingFPN)
    assert output.shared["features"].shape == (2, 16, 8, 12)  # the finest level, stride 4


def test_features_feed_every_head_and_parameter_groups():
    model = tiny_model().train()
    output = model(torch.randn(2, 3, 32, 32))
    features = output.shared["features"]
    for name, prediction in output.predictions.items():
        (grad,) = torch.autograd.grad(prediction.sum(), features, retain_graph=True)
        assert grad.abs().sum() > 0, name
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for m in (model.backbone, model.fpn) for p in m.parameters()}
    assert not shared & {id(p) for p in model.heads.parameters()}
    assert model.pretrained_modules() == []  # random init trains at the full learning rate
    pretrained = build_dense_model(DenseModelConfig(fpn_dim=8, head_dim=8), {"seg": HeadSpec(2)})
    roles = dict((id(p), role) for role, p in pretrained.parameter_groups())
    assert all(roles[id(p)] == "pretrained" for p in pretrained.backbone.parameters())
    assert all(roles[id(p)] == "new" for p in pretrained.fpn.parameters())


def test_architecture_registry_errors():
    assert {"hard_fpn", "mtan", "cross_stitch", "multitask_fpn", "sluice"} <= set(DENSE_ARCHITECTURES)
    with pytest.raises(ValueError, match="unknown dense architecture 'mtan2'; choose one of .*cross_stitch"):
        build_dense_model(DenseModelConfig(backbone=TINY, architecture="mtan2"), HEADS)
    with pytest.raises(ValueError, match="at least one task head"):
        build_dense_model(DenseModelConfig(backbone=TINY), {})
