"""Cross-stitch networks (Misra, Shrivastava, Gupta and Hebert, CVPR 2016).

One column (a copy of the backbone) per task; after every output level, a cross-stitch unit replaces
each column's activations with a learned linear combination of all columns' activations there, per
channel: ``x~_t = sum_s alpha[t, s] * x_s``. The units are what the tasks share. The mixing starts
near identity (a column keeps `self_weight` of its own activations, 0.9 as in the paper, and takes
the rest evenly from the others), so each column starts as its task's own network.

Through the mixing, every task's loss also reaches the other tasks' columns (scaled by the mixing
weights): the columns are soft-shared, not private; each task's decoder and head are its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dualhead.mtl.architectures.stages import BackboneStages


def mixing_init(size: int, self_weight: float) -> Tensor:
    """A ``[size, size]`` mixing matrix: `self_weight` on the diagonal, the rest of each row spread
    evenly over the other entries (each row sums to 1); a 1x1 matrix is 1."""
    if not 0.0 <= self_weight <= 1.0:
        raise ValueError(f"the mixing's self weight must be in [0, 1], got {self_weight}")
    if size == 1:
        return torch.ones(1, 1)
    weights = torch.full((size, size), (1.0 - self_weight) / (size - 1))
    weights.fill_diagonal_(self_weight)
    return weights


class CrossStitchUnit(nn.Module):
    """``[x_1 .. x_T] -> [x~_1 .. x~_T]`` with ``x~_t[:, c] = sum_s alpha[t, s, c] * x_s[:, c]``, for
    activations ``[B, C, ...]``: feature maps ``[B, C, H, W]`` or vectors ``[B, C]``."""

    def __init__(self, num_tasks: int, channels: int, self_weight: float = 0.9):
        super().__init__()
        self.alpha = nn.Parameter(mixing_init(num_tasks, self_weight)[:, :, None].repeat(1, 1, channels))

    def forward(self, activations: Sequence[Tensor]) -> list[Tensor]:
        stacked = torch.stack(list(activations))  # [T, B, C, ...]
        return list(torch.einsum("tsc,sbc...->tbc...", self.alpha.to(stacked.dtype), stacked).unbind(0))


class ColumnNetwork(nn.Module):
    """Task columns run level by level, with a mixing unit after each level:
    ``forward(images) -> {task: [level maps]}``.

    columns: one multi-scale backbone per task (a `dualhead.backbones.features.FeatureBackbone`:
        ``.model`` is the timm feature model, ``.channels`` its levels' channels), all alike.
    make_unit: ``(tasks, channels) -> module`` mixing the columns' activations at a level.
    """

    def __init__(self, columns: Mapping[str, nn.Module], make_unit: Callable[[int, int], nn.Module]):
        super().__init__()
        if not columns:
            raise ValueError(f"a {type(self).__name__} needs at least one task column")
        self.columns = nn.ModuleDict(columns)
        self.channels = list(next(iter(self.columns.values())).channels)
        if any(list(column.channels) != self.channels for column in self.columns.values()):
            raise ValueError(f"the columns of a {type(self).__name__} must be copies of one backbone")
        self.stages = {task: BackboneStages(column.model) for task, column in self.columns.items()}
        self.units = nn.ModuleList(make_unit(len(self.columns), c) for c in self.channels)

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        tasks = list(self.columns)
        activations = [images] * len(tasks)
        levels: dict[str, list[Tensor]] = {task: [] for task in tasks}
        for stage, unit in enumerate(self.units):
            activations = unit(
                [self.stages[task].run(stage, x) for task, x in zip(tasks, activations, strict=True)]
            )
            for task, x in zip(tasks, activations, strict=True):
                levels[task].append(x)
        return levels


class CrossStitchNetwork(ColumnNetwork):
    """Task columns mixed by a cross-stitch unit after each level (``units`` are what the tasks share)."""

    def __init__(self, columns: Mapping[str, nn.Module], self_weight: float = 0.9):
        super().__init__(columns, lambda tasks, channels: CrossStitchUnit(tasks, channels, self_weight))
