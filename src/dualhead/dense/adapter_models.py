"""Per-task modules inside one backbone: adapters, LoRA, and adapters with a task-conditioned shared
head (the reference's Sketch 3). Options: ``model.adapters`` (`AdapterConfig`).

Each task runs the backbone with its own adapters (or LoRA updates) switched in, so a forward costs
one backbone pass per task; then ``adapters`` and ``lora`` give every task its own feature pyramid
and head, and ``adapters_shared_head`` one pyramid and head shared by all tasks, conditioned on the
task by FiLM, with a final 1x1 projection per output channel count.

| architecture | shared: gradient methods act here | a task's own |
| --- | --- | --- |
| ``adapters`` | the backbone, if trained | adapters, pyramid, head |
| ``lora`` | the backbone, if trained | LoRA updates, pyramid, head |
| ``adapters_shared_head`` | the backbone if trained, pyramid, head, FiLM generator | adapters, task embedding, projection |

The backbone is frozen by default (``model.adapters.freeze_backbone``). ``adapters`` and ``lora``
then share nothing trainable: each task trains its own parameters on its own loss, loss weights only
scale them, and gradient methods have nothing to act on (the trainer says so). No representation
feeds every task (each reads its own pass), so gradient methods act on the shared parameters.

``model.adapters.init_from: DIR`` adds tasks to a trained model: the backbone, adapters, pyramids and
heads of the tasks DIR's model has load from it and stay frozen (batch-norm statistics too); only the
new tasks' modules train. DIR is read when the run builds its model (also on ``--resume``); a saved
model of the new run loads on its own (`DenseModel.from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from dualhead.backbones.features import build_feature_backbone
from dualhead.backbones.freeze import batchnorm_eval, freeze_module
from dualhead.core.config import config_from_dict
from dualhead.core.model import TaskOutputs
from dualhead.dense.architectures import task_decoders, task_heads
from dualhead.dense.config import DenseModelConfig
from dualhead.dense.models import ACTIVATIONS, CONFIG_FILE, DENSE_ARCHITECTURES, WEIGHTS_FILE, DenseModel
from dualhead.dense.tasks import HeadSpec
from dualhead.mtl.architectures import (
    FeaturePyramid,
    TaskAdapters,
    TaskFiLM,
    TaskHooks,
    TaskLoRA,
    pack_levels,
)


class TaskAdaptedModel(DenseModel):
    """Base: a backbone run once per task with that task's `TaskHooks` modules switched in."""

    representation_shared_by_tasks = False

    def __init__(self, config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True):
        super().__init__(config, heads, pretrained)
        backbone = build_feature_backbone(self.backbone_config, config.out_indices)
        self.backbone = freeze_module(backbone) if config.adapters.freeze_backbone else backbone
        self.task_hooks = self.build_task_hooks(list(heads))
        self.build_decoding()
        self._frozen_norm_modules: list[nn.Module] = []
        if config.adapters.init_from and pretrained:
            self.init_from(config.adapters.init_from)

    def build_task_hooks(self, tasks: list[str]) -> TaskHooks:
        raise NotImplementedError

    def build_decoding(self) -> None:
        """One feature pyramid and head per task."""
        self.decoders = task_decoders(self.backbone.channels, self.config, list(self.head_specs))
        self.heads = task_heads(self.config, self.head_specs)

    def decode(self, task: str, levels: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        return self.heads[task](self.decoders[task](levels), size)

    def example_input(self) -> Tensor:
        """An input the backbone accepts (to size the adapters): ``backbone.image_size`` or its default."""
        size = self.config.backbone.image_size or self.backbone.data_config["input_size"][-1]
        return torch.zeros(1, 3, size, size)

    @property
    def data_config(self) -> dict[str, Any]:
        return self.backbone.data_config

    def forward(self, images: Tensor) -> TaskOutputs:
        tasks = list(self.head_specs)
        levels = []
        for task in tasks:
            with self.task_hooks.use(task):
                levels.extend(self.backbone(images))
        depth = len(self.backbone.channels)
        packed, views = pack_levels(levels)
        size = images.shape[-2:]
        return TaskOutputs(
            predictions={
                task: self.decode(task, views[i * depth : (i + 1) * depth], size) for i, task in enumerate(tasks)
            },
            shared={self.representation_key: packed},
        )

    def shared_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def task_modules(self, task: str) -> list[nn.Module]:
        return [self.task_hooks.tasks[task], self.decoders[task], self.heads[task]]

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.backbone] if self.config.backbone.weights != "none" else []

    def train(self, mode: bool = True) -> TaskAdaptedModel:
        super().train(mode)
        for module in self._frozen_norm_modules:  # modules loaded by init_from keep their statistics
            batchnorm_eval(module)
        return self

    # -- adding tasks to a trained model ------------------------------------------------------------

    def init_from(self, source: str | Path) -> list[str]:
        """Load what `source`'s saved model has (backbone, its tasks' modules), freeze it, and leave
        only the tasks it lacks to train. Returns those tasks."""
        directory = saved_model_directory(source)
        saved = json.loads((directory / CONFIG_FILE).read_text())
        where = f"model.adapters.init_from={source}"
        saved_config = config_from_dict(DenseModelConfig, saved["model"])
        for name in ("architecture", "out_indices", "fpn_dim", "head_dim"):
            if getattr(saved_config, name) != getattr(self.config, name):
                raise ValueError(
                    f"{where}: the saved model's {name} is {getattr(saved_config, name)!r}, "
                    f"this model's {getattr(self.config, name)!r}"
                )
        ignore_weights = {"weights": "none", "freeze": False}
        if dataclasses.replace(saved_config.backbone, **ignore_weights) != dataclasses.replace(
            self.config.backbone, **ignore_weights
        ):
            raise ValueError(f"{where}: the saved model's backbone {saved_config.backbone} differs from {self.config.backbone}")
        saved_adapters = dataclasses.replace(saved_config.adapters, init_from=None, freeze_backbone=False)
        if saved_adapters != dataclasses.replace(self.config.adapters, init_from=None, freeze_backbone=False):
            raise ValueError(f"{where}: the saved model's adapters {saved_config.adapters} differ from {self.config.adapters}")
        saved_heads = {name: HeadSpec(**spec) for name, spec in saved["heads"].items()}
        unknown = sorted(set(saved_heads) - set(self.head_specs))
        if unknown:
            raise ValueError(f"{where}: the saved model has tasks {unknown} this model lacks ({list(self.head_specs)})")
        changed = sorted(task for task, spec in saved_heads.items() if spec != self.head_specs[task])
        if changed:
            raise ValueError(f"{where}: the heads of {changed} differ from the saved model's")
        new = [task for task in self.head_specs if task not in saved_heads]
        if not new:
            raise ValueError(f"{where}: the saved model already has every task {list(self.head_specs)}; nothing to add")
        new_modules = [module for task in new for module in self.task_modules(task)]
        new_names = {id(p) for module in new_modules for p in module.parameters()}
        new_names |= {id(b) for module in new_modules for b in module.buffers()}
        expected_missing = {name for name, t in self.state_dict(keep_vars=True).items() if id(t) in new_names}
        result = self.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
        # (batch norm fills in a missing num_batches_tracked itself)
        wrong = sorted(set(result.missing_keys) - expected_missing) + sorted(result.unexpected_keys)
        if wrong:
            raise ValueError(f"{where}: the saved weights do not fit this model: {', '.join(wrong[:5])}")
        for param in self.parameters():
            param.requires_grad_(id(param) in new_names)
        self._frozen_norm_modules = [
            module
            for module in self.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and not any(p is not None and id(p) in new_names for p in module.parameters())
        ]
        return new


def saved_model_directory(path: str | Path) -> Path:
    """A saved dense model directory, or a run directory's `best/` (else `last/`) checkpoint."""
    path = Path(path)
    for candidate in (path, path / "best", path / "last"):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{path} is neither a saved dense model nor a run directory with best/ or last/")


@DENSE_ARCHITECTURES.register("adapters")
class AdapterModel(TaskAdaptedModel):
    """Bottleneck adapters per task after every backbone block (``model.adapters.reduction``;
    `dualhead.mtl.architectures.adapters`), a feature pyramid and head per task."""

    def build_task_hooks(self, tasks: list[str]) -> TaskHooks:
        if self.config.adapters.reduction < 1:
            raise ValueError(f"model.adapters.reduction must be >= 1, got {self.config.adapters.reduction}")
        return TaskAdapters(
            self.backbone.model,
            tasks,
            self.example_input(),
            reduction=self.config.adapters.reduction,
            channels_last=self.backbone.channels_last_output,
        )


@DENSE_ARCHITECTURES.register("lora")
class LoRAModel(TaskAdaptedModel):
    """LoRA per task on the backbone's linear layers and 1x1 convolutions (``model.adapters.rank``,
    ``alpha``; `dualhead.mtl.architectures.lora`), a feature pyramid and head per task."""

    def build_task_hooks(self, tasks: list[str]) -> TaskHooks:
        options = self.config.adapters
        if options.rank < 1 or options.alpha <= 0:
            raise ValueError(f"model.adapters.rank must be >= 1 and alpha > 0, got {options.rank} and {options.alpha}")
        return TaskLoRA(self.backbone.model, tasks, rank=options.rank, alpha=options.alpha)


class TaskConditionedHead(nn.Module):
    """One head for every task: 3x3 conv, batch norm, FiLM by the task, ReLU, then a 1x1 projection
    per output channel count (tasks with as many channels share it, starting at the first one's
    bias), upsampling and the task's activation, in float32 as `DenseHead`."""

    def __init__(self, in_channels: int, hidden: int, specs: Mapping[str, HeadSpec], embedding_dim: int = 16):
        super().__init__()
        bad = {task: spec.activation for task, spec in specs.items() if spec.activation not in ACTIVATIONS}
        if bad:
            raise ValueError(f"unknown head activations {bad}; choose from {', '.join(ACTIVATIONS)}")
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(hidden)
        self.film = TaskFiLM(list(specs), hidden, embedding_dim)
        self.specs = dict(specs)
        self.projections = nn.ModuleDict()
        for spec in specs.values():
            key = str(spec.channels)
            if key not in self.projections:
                self.projections[key] = nn.Conv2d(hidden, spec.channels, 1)
                nn.init.constant_(self.projections[key].bias, spec.bias)
        self.activations = nn.ModuleDict({task: ACTIVATIONS[spec.activation]() for task, spec in specs.items()})

    def projection_users(self, key: str) -> list[str]:
        return [task for task, spec in self.specs.items() if str(spec.channels) == key]

    def shared_modules(self) -> list[nn.Module]:
        return [self.conv, self.norm, self.film.generator]

    def task_modules(self, task: str) -> list[nn.Module]:
        """The task's embedding, and its projection where no other task has as many channels."""
        key = str(self.specs[task].channels)
        own = [self.projections[key]] if self.projection_users(key) == [task] else []
        return [self.film.embeddings[task], *own]

    def forward(self, features: Tensor, task: str, size: Sequence[int]) -> Tensor:
        hidden = F.relu(self.film(self.norm(self.conv(features)), task))
        projection = self.projections[str(self.specs[task].channels)]
        with torch.autocast(hidden.device.type, enabled=False):
            logits = F.interpolate(projection(hidden.float()), size=tuple(size), mode="bilinear", align_corners=False)
            return self.activations[task](logits)


@DENSE_ARCHITECTURES.register("adapters_shared_head")
class SharedHeadAdapterModel(AdapterModel):
    """The reference's Sketch 3: per-task adapters in every backbone block, one feature pyramid and
    one output head shared by every task and conditioned on it (`TaskConditionedHead`)."""

    def build_decoding(self) -> None:
        self.pyramid = FeaturePyramid(self.backbone.channels, self.config.fpn_dim)
        self.heads = TaskConditionedHead(self.config.fpn_dim, self.config.head_dim, self.head_specs)

    def decode(self, task: str, levels: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        return self.heads(self.pyramid(levels), task, size)

    def shared_modules(self) -> list[nn.Module]:
        return [self.backbone, self.pyramid, *self.heads.shared_modules()]

    def task_modules(self, task: str) -> list[nn.Module]:
        return [self.task_hooks.tasks[task], *self.heads.task_modules(task)]
