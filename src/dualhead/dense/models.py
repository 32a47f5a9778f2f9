"""Dense multi-task architectures: a multi-scale backbone, shared decoding, one head per task.

``hard_fpn`` is the classic hard-sharing design (the reference's Sketch 1): backbone -> feature
pyramid network -> one map that every head reads. Architectures register in
`DENSE_ARCHITECTURES` and take (model config, {task: HeadSpec}); `DenseModel` gives them
``save_pretrained`` / ``from_pretrained`` (config JSON + safetensors, no pickle). The soft-sharing
and attention designs (``mtan``, ``cross_stitch``, ``multitask_fpn``, ``sluice``) are in
`dualhead.dense.architectures`, registered when this module is imported.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dualhead.backbones.config import VisionConfig
from dualhead.backbones.features import build_feature_backbone
from dualhead.core.config import config_from_dict, config_to_dict
from dualhead.core.model import MultiTaskModel, TaskOutputs
from dualhead.core.registry import Registry
from dualhead.dense.config import DenseModelConfig
from dualhead.dense.tasks import HeadSpec
from dualhead.mtl.architectures.pyramid import FeaturePyramid, conv_bn_relu

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ACTIVATIONS = {"identity": nn.Identity, "softplus": nn.Softplus}

DENSE_ARCHITECTURES: Registry[type[DenseModel]] = Registry("dense architecture")


class DenseModel(MultiTaskModel):
    """Base class of the dense architectures: ``forward(images) -> TaskOutputs`` with one
    ``[B, C, H, W]`` prediction per task at the input's resolution (``[B, Q, C + D]`` for a set
    task, `HeadSpec` ``kind="set"``, where the architecture `supports_set_tasks`).

    `pretrained`: load the backbone's weights from ``config.backbone.weights``; False builds it
    randomly initialised (a saved model's file brings the weights), the config still saying where
    they came from.
    """

    def __init__(self, config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True):
        super().__init__()
        self.config = config
        self.head_specs = dict(heads)
        self.pretrained = pretrained

    #: Whether the architecture builds set-prediction heads (detection, keypoints).
    supports_set_tasks: bool = False

    @property
    def backbone_config(self) -> VisionConfig:
        """The backbone config to build from: without its weights' source unless `pretrained`."""
        backbone = self.config.backbone
        return backbone if self.pretrained else dataclasses.replace(backbone, weights="none")

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone's preprocessing (mean, std)."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> None:
        """Config JSON (model config and heads) and safetensors weights; no pickle."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        heads = {name: dataclasses.asdict(spec) for name, spec in self.head_specs.items()}
        (directory / CONFIG_FILE).write_text(json.dumps({"model": config_to_dict(self.config), "heads": heads}, indent=2))
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> DenseModel:
        """Rebuild a saved model of any registered architecture offline (backbone weights come from
        the file, not their source)."""
        directory = Path(directory)
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a saved dense model: missing {', '.join(missing)}")
        saved = json.loads((directory / CONFIG_FILE).read_text())
        config = config_from_dict(DenseModelConfig, saved["model"])
        heads = {name: HeadSpec(**spec) for name, spec in saved["heads"].items()}
        model = build_dense_model(config, heads, pretrained=False)
        model.load_weights(directory, map_location)
        return model.to(map_location)

    def load_weights(self, directory: str | Path, map_location: str | torch.device = "cpu") -> None:
        """Load the weights of a saved model of the same configuration into this one."""
        self.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE), device=str(map_location)))

    def task_modules(self, task: str) -> list[nn.Module]:
        """The modules only `task`'s loss reaches (its decoder and head): no other task's loss gives
        them a gradient. What is neither shared nor a task's own is soft-shared (cross-stitch columns)."""
        return [self.heads[task]]


def build_dense_model(config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True) -> DenseModel:
    """The architecture `config.architecture` names, with one head per entry of `heads`."""
    if not heads:
        raise ValueError("a dense model needs at least one task head")
    set_tasks = [name for name, spec in heads.items() if spec.kind == "set"]
    if set_tasks and not DENSE_ARCHITECTURES.lookup(config.architecture).supports_set_tasks:
        able = [name for name in DENSE_ARCHITECTURES if DENSE_ARCHITECTURES.lookup(name).supports_set_tasks]
        raise ValueError(
            f"model.architecture={config.architecture!r} predicts maps, not the sets that {set_tasks} need; "
            f"use {' or '.join(able)}"
        )
    return DENSE_ARCHITECTURES.build(config.architecture, config, heads, pretrained=pretrained)


class DenseHead(nn.Module):
    """conv-BN-ReLU, a 1x1 conv to the task's channels, bilinear upsampling to the input size, activation.

    The output layer runs in float32 even under bf16 autocast: bf16 keeps 8 bits of mantissa, a
    3 cm step at a depth of 8 m, as coarse as the errors being learnt.
    """

    def __init__(self, in_channels: int, hidden: int, spec: HeadSpec):
        super().__init__()
        if spec.activation not in ACTIVATIONS:
            raise ValueError(f"unknown head activation {spec.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.block = conv_bn_relu(in_channels, hidden)
        self.out = nn.Conv2d(hidden, spec.channels, 1)
        nn.init.constant_(self.out.bias, spec.bias)
        self.activation = ACTIVATIONS[spec.activation]()

    def forward(self, features: Tensor, size: Sequence[int]) -> Tensor:
        hidden = self.block(features)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = F.interpolate(self.out(hidden.float()), size=tuple(size), mode="bilinear", align_corners=False)
            return self.activation(logits)


class SharedBackboneModel(DenseModel):
    """A dense architecture with one backbone that every task reads: it gives the preprocessing and
    is the pretrained part (subclasses add what comes after it)."""

    def __init__(self, config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True):
        super().__init__(config, heads, pretrained)
        self.backbone = build_feature_backbone(self.backbone_config, config.out_indices)

    @property
    def data_config(self) -> dict[str, Any]:
        return self.backbone.data_config

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.backbone] if self.config.backbone.weights != "none" else []


@DENSE_ARCHITECTURES.register("hard_fpn")
class HardSharingFPN(SharedBackboneModel):
    """Hard parameter sharing: backbone and FPN shared by all tasks, a small head per task."""

    def __init__(self, config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True):
        super().__init__(config, heads, pretrained)
        self.fpn = FeaturePyramid(self.backbone.channels, config.fpn_dim)
        self.heads = nn.ModuleDict({name: DenseHead(config.fpn_dim, config.head_dim, spec) for name, spec in heads.items()})

    def forward(self, images: Tensor) -> TaskOutputs:
        features = self.fpn(self.backbone(images))
        size = images.shape[-2:]
        return TaskOutputs(
            predictions={name: head(features, size) for name, head in self.heads.items()},
            shared={self.representation_key: features},
        )

    def shared_modules(self) -> list[nn.Module]:
        return [self.backbone, self.fpn]


# The other architectures register themselves in DENSE_ARCHITECTURES (they build on the classes above).
from dualhead.dense import adapter_models as _adapter_models  # noqa: E402, F401
from dualhead.dense import architectures as _architectures  # noqa: E402, F401
from dualhead.dense import query_models as _query_models  # noqa: E402, F401
from dualhead.dense import routing_models as _routing_models  # noqa: E402, F401
