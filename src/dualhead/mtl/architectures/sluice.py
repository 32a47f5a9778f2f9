"""Sluice networks (Ruder, Bingel, Augenstein and Søgaard, AAAI 2019), for multi-scale backbones.

Cross-stitch generalised: each column's channels at a level are split into `subspaces` equal groups,
and a learned ``[T*G, T*G]`` matrix mixes every subspace of every column into every other (so a task
can keep one subspace to itself and share another), starting near identity. Each task also learns
which levels it reads (the paper's layer selection, beta): one weight per level on the task
decoder's fusion of the levels (`LayerSelection`, used through ``FeaturePyramid(level_weights=...)``).

The mixing matrices are shared by the tasks; the layer selection, decoder and head are a task's own;
the columns are soft-shared (every task's loss reaches every column through the mixing). The paper's
orthogonality penalty pushes a column's subspaces apart (`subspace_orthogonality`), so that one can
hold what the task shares and another what it keeps to itself.
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

    def orthogonality(self, levels: Mapping[str, Sequence[Tensor]]) -> Tensor:
        """The mean over tasks of `subspace_orthogonality` of their mixed level maps (`forward`'s output)."""
        subspaces = self.units[0].subspaces
        return torch.stack([subspace_orthogonality(maps, subspaces) for maps in levels.values()]).mean()


def subspace_orthogonality(levels: Sequence[Tensor], subspaces: int) -> Tensor:
    """Ruder et al.'s orthogonality penalty ``sum_{g<h} ||G_g^T G_h||_F^2`` between the channel
    subspaces of each level ``[B, C, H, W]`` (G_g: the g-th group of C / subspaces channels, one row per
    pixel), averaged over levels. Each product is divided by the rows (pixels) so that the penalty does
    not grow with batch or map size; 0 for one subspace."""
    terms = []
    for x in levels:
        groups = x.float().unflatten(1, (subspaces, -1))  # [B, G, C/G, H, W]
        rows = groups.movedim(1, 0).movedim(2, -1).flatten(1, -2)  # [G, B*H*W, C/G]
        gram = torch.einsum("grc,hrd->ghcd", rows, rows) / rows.shape[1]  # [G, G, C/G, C/G]
        upper = torch.triu_indices(subspaces, subspaces, offset=1, device=x.device)
        terms.append(gram[upper[0], upper[1]].pow(2).sum())
    return torch.stack(terms).mean() if terms else torch.zeros(())
