"""Sluice networks (Ruder, Bingel, Augenstein and Søgaard, AAAI 2019), for multi-scale backbones.

Cross-stitch generalised: each column's channels at a level are split into `subspaces` equal groups,
and a learned ``[T*G, T*G]`` matrix mixes every subspace of every column into every other (so a task
can keep one subspace to itself and share another), starting near identity. Each task also learns
which levels it reads (the paper's layer selection, beta): one weight per level on the task
decoder's fusion of the levels (`LayerSelection`, used through ``FeaturePyramid(level_weights=...)``).

The mixing matrices are shared by the tasks; the layer selection, decoder and head are a task's own;
the columns are soft-shared (every task's loss reaches every column through the mixing). The paper's
orthogonality penalty between subspaces is not included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dualhead.mtl.architectures.cross_stitch import ColumnNetwork, mixing_init


class SluiceUnit(nn.Module):
    """``x~[t, g] = sum_{s, h} alpha[t, g, s, h] * x[s, h]`` over tasks t, s and subspaces g, h of a level."""

    def __init__(self, num_tasks: int, channels: int, subspaces: int = 2, self_weight: float = 0.9):
        super().__init__()
        if subspaces < 1 or channels % subspaces:
            raise ValueError(
                f"sluice subspaces must divide every level's channels: {subspaces} does not divide {channels}"
            )
        self.subspaces = subspaces
        init = mixing_init(num_tasks * subspaces, self_weight)
        self.alpha = nn.Parameter(init.view(num_tasks, subspaces, num_tasks, subspaces))

    def forward(self, activations: Sequence[Tensor]) -> list[Tensor]:
        stacked = torch.stack(list(activations))  # [T, B, C, H, W]
        parts = stacked.unflatten(2, (self.subspaces, -1))  # [T, B, G, C/G, H, W]
        mixed = torch.einsum("tgsh,sbhcxy->tbgcxy", self.alpha.to(parts.dtype), parts)
        return list(mixed.flatten(2, 3).unbind(0))


class LayerSelection(nn.Module):
    """A task's learned weight per level (all 1 at first: the plain sum)."""

    def __init__(self, levels: int):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(levels))


class SluiceNetwork(ColumnNetwork):
    """Task columns mixed by subspace after each level (``units``, shared by the tasks);
    ``selection[task].weights`` weigh the levels in the task's decoder.

    columns: one multi-scale backbone per task, all alike (see `ColumnNetwork`).
    """

    def __init__(self, columns: Mapping[str, nn.Module], subspaces: int = 2, self_weight: float = 0.9):
        super().__init__(columns, lambda tasks, channels: SluiceUnit(tasks, channels, subspaces, self_weight))
        self.selection = nn.ModuleDict({task: LayerSelection(len(self.channels)) for task in self.columns})
