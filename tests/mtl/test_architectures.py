"""The application-free architecture blocks: stages, packing, cross-stitch and sluice mixing, MTAN,
the multi-task pyramid."""

from __future__ import annotations

import pytest
import timm
import torch

from dualhead.backbones.config import VisionConfig
from dualhead.backbones.features import build_feature_backbone
from dualhead.mtl.architectures import (
    MTAN,
    BackboneStages,
    CrossStitchNetwork,
    CrossStitchUnit,
    FeaturePyramid,
    MultiTaskPyramid,
    SluiceNetwork,
    SluiceUnit,
    mixing_init,
    pack_levels,
)

TINY = VisionConfig(name="mobilenetv3_small_050", weights="none", norm_eval=False)


@pytest.mark.parametrize(
    ("name", "out_indices"),
    [("mobilenetv3_small_050", (1, 2, 3, 4)), ("efficientnet_lite0", (0, 2, 4)), ("resnet10t", (1, 2, 3, 4))],
)
def test_stages_reproduce_the_backbone(name, out_indices):
    """MobileNetV3 / EfficientNet feature models and timm's generic FeatureListNet (ResNet)."""
    model = timm.create_model(name, features_only=True, out_indices=out_indices).eval()
    stages = BackboneStages(model)
    images = torch.randn(1, 3, 64, 64)
    x, outputs = images, []
    for stage in range(len(stages)):
        x = stages.run(stage, x)
        outputs.append(x)
    expected = model(images)
    assert len(outputs) == len(expected) == len(out_indices)
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(stages).values())  # registers nothing


def test_stages_refuse_backbones_that_cannot_run_level_by_level():
    vit = timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(1, 2), img_size=32)
    with pytest.raises(ValueError, match="cannot run FeatureGetterNet level by level"):
        BackboneStages(vit)


def test_pack_levels_views_share_the_packed_tensor():
    maps = [torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 5, 2, 2, requires_grad=True)]
    packed, views = pack_levels(maps)
    assert packed.shape == (2, 3 * 16 + 5 * 4)
    for view, x in zip(views, maps, strict=True):
        torch.testing.assert_close(view, x, rtol=0, atol=0)
        assert view.stride()[1] == 1  # channels innermost
    # Every path from the maps to a loss of the views passes through `packed`.
    loss = (views[0] ** 2).sum() + views[1].sum()
    (at_packed,) = torch.autograd.grad(loss, packed, retain_graph=True)
    direct = torch.autograd.grad(loss, maps, retain_graph=True)
    through = torch.autograd.grad(packed, maps, grad_outputs=at_packed)
    for a, b in zip(direct, through, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="map 1 has shape"):
        pack_levels([torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4)])


def test_mixing_starts_near_identity():
    torch.testing.assert_close(
        mixing_init(3, 0.9), torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]])
    )
    assert mixing_init(1, 0.9).item() == 1.0  # one task: nothing to mix
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        mixing_init(2, 1.5)


def test_cross_stitch_unit_mixes_per_channel():
    unit = CrossStitchUnit(2, channels=3, self_weight=0.9)
    a, b = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    mixed_a, mixed_b = unit([a, b])
    torch.testing.assert_close(mixed_a, 0.9 * a + 0.1 * b)
    torch.testing.assert_close(mixed_b, 0.1 * a + 0.9 * b)
    with torch.no_grad():
        unit.alpha[0, 1, 2] = 0.5  # channel 2 of column 0 takes half of column 1's channel 2
    mixed_a, _ = unit([a, b])
    torch.testing.assert_close(mixed_a[:, 2], 0.9 * a[:, 2] + 0.5 * b[:, 2])
    torch.testing.assert_close(mixed_a[:, :2], 0.9 * a[:, :2] + 0.1 * b[:, :2])


def test_sluice_unit_mixes_subspaces_across_tasks():
    unit = SluiceUnit(2, channels=4, subspaces=2, self_weight=1.0)
    a, b = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    same_a, same_b = unit([a, b])
    torch.testing.assert_close(same_a, a)  # identity mixing
    torch.testing.assert_close(same_b, b)
    with torch.no_grad():
        unit.alpha.zero_()
        unit.alpha[0, 1, 1, 0] = 1.0  # task 0's second subspace := task 1's first subspace
    mixed_a, mixed_b = unit([a, b])
    torch.testing.assert_close(mixed_a[:, 2:], b[:, :2])
    assert (mixed_a[:, :2] == 0).all() and (mixed_b == 0).all()
    with pytest.raises(ValueError, match="3 does not divide 4"):
        SluiceUnit(2, channels=4, subspaces=3)


def test_columns_without_mixing_are_independent_networks():
    """With self weight 1 a cross-stitch network is one backbone per task, run on its own."""
    column = build_feature_backbone(TINY).eval()
    copy = build_feature_backbone(TINY).eval()
    network = CrossStitchNetwork({"a": column, "b": copy}, self_weight=1.0).eval()
    images = torch.randn(2, 3, 32, 32)
    levels = network(images)
    for task, backbone in (("a", column), ("b", copy)):
        for got, want in zip(levels[task], backbone(images), strict=True):
            torch.testing.assert_close(got, want)
    assert [unit.alpha.shape for unit in network.units] == [(2, 2, c) for c in column.channels]
    sluice = SluiceNetwork(
        {"a": build_feature_backbone(TINY), "b": build_feature_backbone(TINY)}, subspaces=2
    )
    assert [unit.alpha.shape for unit in sluice.units] == [(2, 2, 2, 2)] * 4
    assert sluice.selection["a"].weights.tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="copies of one backbone"):
        CrossStitchNetwork(
            {
                "a": column,
                "b": build_feature_backbone(VisionConfig(name="efficientnet_lite0", weights="none")),
            }
        )


def test_mtan_masks_scale_the_shared_features():
    channels = [4, 8]
    mtan = MTAN(channels, ["a", "b"]).eval()
    levels = [torch.rand(2, 4, 8, 8), torch.rand(2, 8, 4, 4)]
    attended = mtan(levels)
    for task in ("a", "b"):
        for got, shared in zip(attended[task], levels, strict=True):
            assert got.shape == shared.shape
            assert (got.abs() <= shared.abs()).all()  # a mask in (0, 1) times the shared features
    assert not set(map(id, mtan.tasks["a"].parameters())) & set(map(id, mtan.tasks["b"].parameters()))
    with pytest.raises(ValueError, match=r"expects levels of \[4, 8\] channels"):
        mtan([torch.rand(2, 4, 8, 8), torch.rand(2, 6, 4, 4)])


def test_multitask_pyramid_puts_each_task_at_its_finest_level():
    pyramid = MultiTaskPyramid([4, 8, 16], dim=6, task_levels={"fine": [0, 1, 2], "coarse": [2, 1]})
    features = [torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)]
    maps = pyramid(features)
    assert maps["fine"].shape == (1, 6, 16, 16) and maps["coarse"].shape == (1, 6, 8, 8)
    assert len(pyramid.tasks["coarse"].lateral) == 2
    with pytest.raises(ValueError, match=r"levels of task 'depth' must be distinct positions in 0..2"):
        MultiTaskPyramid([4, 8, 16], 6, {"depth": [1, 3]})
    with pytest.raises(ValueError, match="levels of task 'seg'"):
        MultiTaskPyramid([4, 8, 16], 6, {"seg": []})


def test_feature_pyramid_level_weights():
    pyramid = FeaturePyramid([4, 8], dim=6).eval()
    features = [torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)]
    torch.testing.assert_close(pyramid(features, level_weights=torch.ones(2)), pyramid(features))
    only_fine = pyramid(features, level_weights=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(
        only_fine,
        pyramid.fuse[0](
            pyramid.smooth[0](
                pyramid.lateral[0](features[0])
                + torch.nn.functional.interpolate(pyramid.lateral[1](features[1]), size=(8, 8))
            )
        ),
    )
    with pytest.raises(ValueError, match="one weight per level"):
        pyramid(features, level_weights=torch.ones(3))


def test_subspace_orthogonality_is_zero_for_orthogonal_subspaces_and_grows_with_overlap():
    from dualhead.mtl.architectures.sluice import subspace_orthogonality

    # every pixel's first subspace (channels 0-1) and second (2-3): disjoint supports are orthogonal
    apart = torch.zeros(2, 4, 3, 3)
    apart[:, :2, :, :2], apart[:, 2:, :, 2:] = 1.0, 1.0
    assert subspace_orthogonality([apart], subspaces=2) == 0
    same = torch.ones(2, 4, 3, 3)  # both subspaces equal: G_1^T G_2 / pixels is all ones (2x2)
    assert subspace_orthogonality([same], subspaces=2) == pytest.approx(4.0)
    assert subspace_orthogonality([same, apart], subspaces=2) == pytest.approx(2.0)  # mean over levels
    assert subspace_orthogonality([same], subspaces=1) == 0
    grad = torch.ones(1, 4, 2, 2, requires_grad=True)
    subspace_orthogonality([grad], subspaces=2).backward()
    assert grad.grad.abs().sum() > 0
