"""Feature pyramids over a multi-scale backbone, the decoder every dense architecture here builds on.

`TopDownPyramid` is FPN's lateral and top-down pathway (Lin et al., CVPR 2017); `FeaturePyramid`
adds Panoptic FPN's fusion of the levels into one map (Kirillov et al., CVPR 2019), optionally with
a learned weight per level (a sluice network's layer selection).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def resize_sum(maps: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """The sum of `maps`, each resized bilinearly to `size` where it differs."""
    size = tuple(size)
    resized = [
        x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for x in maps
    ]
    return sum(resized[1:], resized[0])


class TopDownPyramid(nn.Module):
    """FPN's pyramid: lateral 1x1 convs bring every level to `dim` channels, a top-down pass adds each
    coarser level (nearest upsampling) to the next finer one, and 3x3 convs smooth the sums."""

    def __init__(self, in_channels: Sequence[int], dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in in_channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """One `dim`-channel map per level, finest first, at the levels' own resolutions."""
        levels = [lateral(x) for lateral, x in zip(self.lateral, features, strict=True)]
        for i in range(len(levels) - 2, -1, -1):
            levels[i] = levels[i] + F.interpolate(levels[i + 1], size=levels[i].shape[-2:], mode="nearest")
        return [smooth(x) for smooth, x in zip(self.smooth, levels, strict=True)]


class FeaturePyramid(TopDownPyramid):
    """FPN fused into one map at the finest level: each pyramid level goes through a 3x3 conv-BN-ReLU,
    is upsampled bilinearly to the finest level, and the levels are summed (Panoptic FPN's semantic
    head). `level_weights` (one scalar per level) weighs the levels in that sum."""

    def __init__(self, in_channels: Sequence[int], dim: int):
        super().__init__(in_channels, dim)
        self.fuse = nn.ModuleList(conv_bn_relu(dim, dim) for _ in in_channels)

    def forward(self, features: Sequence[Tensor], level_weights: Tensor | None = None) -> Tensor:
        levels = super().forward(features)
        fused = [fuse(x) for fuse, x in zip(self.fuse, levels, strict=True)]
        if level_weights is not None:
            if level_weights.shape != (len(fused),):
                raise ValueError(
                    f"level_weights must hold one weight per level ({len(fused)}), "
                    f"got shape {tuple(level_weights.shape)}"
                )
            fused = [weight * x for weight, x in zip(level_weights.to(fused[0].dtype), fused, strict=True)]
        return resize_sum(fused, fused[0].shape[-2:])
