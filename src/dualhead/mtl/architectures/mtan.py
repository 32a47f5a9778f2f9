"""Multi-Task Attention Network (Liu, Johns and Davison, CVPR 2019) over a multi-scale backbone.

Every task reads the shared backbone through its own soft attention masks, one per level: at level
``l`` the mask is computed from the shared features there and the task's attended features of level
``l - 1`` (through a 3x3 conv and max pooling to this level's size), and multiplies the shared
features elementwise. Each task thus picks, channel by channel and pixel by pixel, what it uses of
one shared representation.

As in the official code, the 3x3 convolution between levels (the paper's f) is shared by the tasks
and the attention modules (g and h: 1x1 conv-BN-ReLU, 1x1 conv-BN-sigmoid) are the tasks' own. Here
each task keeps its own batch norm after the shared convolution, since the convolution sees each
task's attended features and their statistics differ (one shared norm would mix them in its running
statistics). LibMTL's port builds its per-task attention as ``ModuleList([layer] * tasks)``, which is
one module shared by every task; here each task has its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionMask(nn.Module):
    """``[B, in, H, W] -> [B, channels, H, W]`` in (0, 1): 1x1 conv-BN-ReLU, 1x1 conv-BN, sigmoid."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TaskAttention(nn.Module):
    """One task's part of MTAN: an attention mask per level, and its batch norm after each shared
    convolution between levels."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.masks = nn.ModuleList(
            AttentionMask(c if level == 0 else 2 * c, c) for level, c in enumerate(channels)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in channels[1:])


class MTAN(nn.Module):
    """``forward(levels) -> {task: attended levels}`` for shared feature maps `levels` (finest first,
    with `channels` channels); the attended maps have the shared maps' shapes.

    ``shared`` (the convolutions between levels) serves every task; ``tasks[name]`` is one task's.
    """

    def __init__(self, channels: Sequence[int], tasks: Sequence[str]):
        super().__init__()
        if not tasks:
            raise ValueError("MTAN needs at least one task")
        self.channels = list(channels)
        self.shared = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
        )
        self.tasks = nn.ModuleDict({task: TaskAttention(channels) for task in tasks})

    def forward(self, levels: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        if [x.shape[1] for x in levels] != self.channels:
            raise ValueError(
                f"MTAN expects levels of {self.channels} channels, got {[x.shape[1] for x in levels]}"
            )
        attended: dict[str, list[Tensor]] = {}
        for task, attention in self.tasks.items():
            maps: list[Tensor] = []
            for level, shared in enumerate(levels):
                if level == 0:
                    mask_input = shared
                else:
                    previous = F.relu(attention.norms[level - 1](self.shared[level - 1](maps[-1])))
                    previous = F.adaptive_max_pool2d(previous, shared.shape[-2:])
                    mask_input = torch.cat([shared, previous], dim=1)
                maps.append(attention.masks[level](mask_input) * shared)
            attended[task] = maps
        return attended
