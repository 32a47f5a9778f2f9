"""The dense registrations of the multi-task architectures in `dualhead.mtl.architectures`.

Each takes any timm backbone `build_feature_backbone` supports (``cross_stitch`` and ``sluice``: the
CNNs timm can run level by level) and any set of dense tasks, and declares what its tasks share:

| architecture | shared: gradient methods act here | a task's own | representation shared by tasks |
| --- | --- | --- | --- |
| ``hard_fpn`` | backbone, FPN | head | yes: the fused FPN map |
| ``mtan`` | backbone, convs between levels | attention masks, FPN, head | yes: the backbone's levels |
| ``multitask_fpn`` | backbone, pyramid | lateral connections, fusion, head | yes: the backbone's levels |
| ``cross_stitch`` | cross-stitch units | FPN, head | no: each task reads its own column |
| ``sluice`` | sluice units | layer selection, FPN, head | no: each task reads its own column |

The columns of ``cross_stitch`` and ``sluice`` (one backbone copy per task, each starting from the
same weights) are soft-shared: every task's loss reaches every column through the learned mixing,
so they are neither shared in that table nor a task's own; they train on the plain sum of the
tasks' gradients. Where the tasks read several maps, the shared representation is those maps packed
into one tensor (`dualhead.mtl.architectures.pack_levels`), so gradient methods in representation
mode see everything that reaches the backbone.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from dualhead.backbones.features import FeatureBackbone, build_feature_backbone
from dualhead.core.model import TaskOutputs
from dualhead.dense.config import DenseModelConfig
from dualhead.dense.models import DENSE_ARCHITECTURES, DenseHead, DenseModel, SharedBackboneModel
from dualhead.dense.tasks import DENSE_TASKS, HeadSpec
from dualhead.mtl.architectures import (
    MTAN,
    ColumnNetwork,
    CrossStitchNetwork,
    FeaturePyramid,
    MultiTaskPyramid,
    SluiceNetwork,
    pack_levels,
)


def task_heads(config: DenseModelConfig, heads: Mapping[str, HeadSpec]) -> nn.ModuleDict:
    """One `DenseHead` per task, reading `config.fpn_dim` channels."""
    return nn.ModuleDict(
        {name: DenseHead(config.fpn_dim, config.head_dim, spec) for name, spec in heads.items()}
    )


def task_decoders(channels: Sequence[int], config: DenseModelConfig, tasks: Sequence[str]) -> nn.ModuleDict:
    """One feature pyramid per task over levels of `channels` channels."""
    return nn.ModuleDict({task: FeaturePyramid(channels, config.fpn_dim) for task in tasks})


@DENSE_ARCHITECTURES.register("mtan")
class MTANModel(SharedBackboneModel):
    """MTAN: a shared backbone, per-task attention over each of its levels, a feature pyramid and a
    head per task (`dualhead.mtl.architectures.mtan`)."""

    def __init__(self, config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True):
        super().__init__(config, heads, pretrained)
        self.attention = MTAN(self.backbone.channels, list(heads))
        self.decoders = task_decoders(self.backbone.channels, config, list(heads))
        self.heads = task_heads(config, heads)

    def forward(self, images: Tensor) -> TaskOutputs:
        packed, levels = pack_levels(self.backbone(images))
        attended = self.attention(levels)
        size = images.shape[-2:]
        return TaskOutputs(
            predictions={
                task: head(self.decoders[task](attended[task]), size) for task, head in self.heads.items()
            },
            shared={self.representation_key: packed},
        )

    def shared_modules(self) -> list[nn.Module]:
        return [self.backbone, self.attention.shared]

    def task_modules(self, task: str) -> list[nn.Module]:
        return [self.attention.tasks[task], self.decoders[task], self.heads[task]]


@DENSE_ARCHITECTURES.register("multitask_fpn")
class MultiTaskFPNModel(SharedBackboneModel):
    """A shared backbone and pyramid, task-specific lateral connections, and each task's head at the
    finest of the levels it reads (``model.task_levels``; `dualhead.mtl.architectures.multitask_fpn`)."""

    def __init__(self, config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True):
        super().__init__(config, heads, pretrained)
        unknown = sorted(set(config.task_levels) - set(heads) - set(DENSE_TASKS))
        if unknown:
            raise ValueError(
                f"model.task_levels names unknown tasks {unknown}; this model's tasks are {list(heads)}"
            )
        every_level = list(range(len(self.backbone.channels)))
        levels = {task: list(config.task_levels.get(task, every_level)) for task in heads}
        try:
            self.pyramid = MultiTaskPyramid(self.backbone.channels, config.fpn_dim, levels)
        except ValueError as err:
            raise ValueError(f"model.task_levels: {err}") from None
        self.heads = task_heads(config, heads)

    def forward(self, images: Tensor) -> TaskOutputs:
        packed, levels = pack_levels(self.backbone(images))
        maps = self.pyramid(levels)
        size = images.shape[-2:]
        return TaskOutputs(
            predictions={task: head(maps[task], size) for task, head in self.heads.items()},
            shared={self.representation_key: packed},
        )

    def shared_modules(self) -> list[nn.Module]:
        return [self.backbone, self.pyramid.shared]

    def task_modules(self, task: str) -> list[nn.Module]:
        return [self.pyramid.tasks[task], self.heads[task]]


class ColumnModel(DenseModel):
    """Base of the soft-sharing designs: one backbone column per task (copies of one backbone, so
    they start from the same weights), mixed by a `ColumnNetwork`, then a pyramid and a head per task.

    No representation feeds every task (each reads its own column), so gradient methods act on the
    declared shared parameters, the mixing units.
    """

    representation_shared_by_tasks = False

    def __init__(self, config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True):
        super().__init__(config, heads, pretrained)
        if not 0.0 <= config.stitch_self_weight <= 1.0:
            raise ValueError(f"model.stitch_self_weight must be in [0, 1], got {config.stitch_self_weight}")
        column = build_feature_backbone(self.backbone_config, config.out_indices)
        # One backbone per task: built (weights loaded) once, then copied.
        columns = {task: column if index == 0 else copy.deepcopy(column) for index, task in enumerate(heads)}
        self.network = self.build_network(columns)
        self.decoders = task_decoders(self.network.channels, config, list(heads))
        self.heads = task_heads(config, heads)

    def build_network(self, columns: dict[str, FeatureBackbone]) -> ColumnNetwork:
        """The columns and their mixing units."""
        raise NotImplementedError

    @property
    def data_config(self) -> dict[str, Any]:
        return next(iter(self.network.columns.values())).data_config

    def decode(self, task: str, levels: Sequence[Tensor]) -> Tensor:
        return self.decoders[task](levels)

    def forward(self, images: Tensor) -> TaskOutputs:
        columns = self.network(images)
        tasks = list(self.heads)
        depth = len(self.network.channels)
        packed, views = pack_levels([x for task in tasks for x in columns[task]])
        size = images.shape[-2:]
        return TaskOutputs(
            predictions={
                task: self.heads[task](self.decode(task, views[i * depth : (i + 1) * depth]), size)
                for i, task in enumerate(tasks)
            },
            shared={self.representation_key: packed},
            auxiliary_loss=self.regulariser(columns),
        )

    def regulariser(self, columns: dict[str, list[Tensor]]) -> Tensor | None:
        """A weighted penalty on the mixed columns (`TaskOutputs.auxiliary_loss`); None by default."""
        return None

    def shared_modules(self) -> list[nn.Module]:
        return [self.network.units]

    def task_modules(self, task: str) -> list[nn.Module]:
        return [self.decoders[task], self.heads[task]]

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.network.columns] if self.config.backbone.weights != "none" else []


@DENSE_ARCHITECTURES.register("cross_stitch")
class CrossStitchModel(ColumnModel):
    """Cross-stitch networks: task columns mixed per channel after every level
    (``model.stitch_self_weight``; `dualhead.mtl.architectures.cross_stitch`)."""

    def build_network(self, columns: dict[str, FeatureBackbone]) -> ColumnNetwork:
        return CrossStitchNetwork(columns, self.config.stitch_self_weight)


@DENSE_ARCHITECTURES.register("sluice")
class SluiceModel(ColumnModel):
    """Sluice networks: task columns mixed by channel subspace after every level, and a learned
    weight per level in each task's pyramid (``model.sluice_subspaces``, ``model.stitch_self_weight``,
    ``model.sluice_orthogonality``; `dualhead.mtl.architectures.sluice`)."""

    def build_network(self, columns: dict[str, FeatureBackbone]) -> ColumnNetwork:
        if self.config.sluice_orthogonality < 0:
            raise ValueError(f"model.sluice_orthogonality must be >= 0, got {self.config.sluice_orthogonality}")
        try:
            return SluiceNetwork(columns, self.config.sluice_subspaces, self.config.stitch_self_weight)
        except ValueError as err:
            raise ValueError(f"model.sluice_subspaces: {err}") from None

    def decode(self, task: str, levels: Sequence[Tensor]) -> Tensor:
        return self.decoders[task](levels, level_weights=self.network.selection[task].weights)

    def regulariser(self, columns: dict[str, list[Tensor]]) -> Tensor | None:
        """``model.sluice_orthogonality`` times the subspaces' orthogonality penalty (off at 0)."""
        weight = self.config.sluice_orthogonality
        return weight * self.network.orthogonality(columns) if weight > 0 else None

    def task_modules(self, task: str) -> list[nn.Module]:
        return [self.network.selection[task], self.decoders[task], self.heads[task]]
