"""A multi-task feature pyramid: one shared pyramid, task-specific lateral connections, and each
task's map at the scales it prefers.

FPN is multi-task by nature (the reference's pattern 5): tasks share the backbone and the pyramid's
lateral and top-down pathway, and each task adds its own lateral connections, 1x1 convs that pick
from the backbone's levels what it needs, to the shared pyramid's levels. Each task fuses only the
levels it prefers (segmentation may want all, depth the coarse ones, normals the fine ones) into one
map at the finest of them, so its head runs at that scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from dualhead.mtl.architectures.pyramid import TopDownPyramid, conv_bn_relu, resize_sum


class TaskPyramid(nn.Module):
    """One task's part: lateral 1x1 convs from its levels of the backbone, added to the shared
    pyramid there, then a conv-BN-ReLU per level and the levels' sum at the finest of them."""

    def __init__(self, in_channels: Sequence[int], dim: int, levels: Sequence[int]):
        super().__init__()
        self.levels = sorted(levels)
        self.lateral = nn.ModuleList(nn.Conv2d(in_channels[level], dim, 1) for level in self.levels)
        self.fuse = nn.ModuleList(conv_bn_relu(dim, dim) for _ in self.levels)

    def forward(self, features: Sequence[Tensor], pyramid: Sequence[Tensor]) -> Tensor:
        maps = [
            fuse(pyramid[level] + lateral(features[level]))
            for level, lateral, fuse in zip(self.levels, self.lateral, self.fuse, strict=True)
        ]
        return resize_sum(maps, maps[0].shape[-2:])


class MultiTaskPyramid(nn.Module):
    """``forward(features) -> {task: [B, dim, H_l, W_l]}`` at each task's finest preferred level `l`.

    in_channels: the backbone levels' channels, finest first.
    task_levels: for each task, the levels (positions in `in_channels`, 0 = finest) it reads.
    ``shared`` is the pyramid every task reads; ``tasks[name]`` is one task's.
    """

    def __init__(self, in_channels: Sequence[int], dim: int, task_levels: Mapping[str, Sequence[int]]):
        super().__init__()
        if not task_levels:
            raise ValueError("a multi-task pyramid needs at least one task")
        for task, levels in task_levels.items():
            if (
                not levels
                or len(set(levels)) != len(levels)
                or not all(0 <= level < len(in_channels) for level in levels)
            ):
                raise ValueError(
                    f"the pyramid levels of task {task!r} must be distinct positions in "
                    f"0..{len(in_channels) - 1} (one per backbone level, 0 = finest), got {list(levels)}"
                )
        self.shared = TopDownPyramid(in_channels, dim)
        self.tasks = nn.ModuleDict(
            {task: TaskPyramid(in_channels, dim, levels) for task, levels in task_levels.items()}
        )

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        pyramid = self.shared(features)
        return {task: branch(features, pyramid) for task, branch in self.tasks.items()}
