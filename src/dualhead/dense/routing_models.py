"""The dense registrations of routing (``moe``) and hypernetwork heads (``hypernet``).

| architecture | shared: gradient methods act here | a task's own | representation shared by tasks |
| --- | --- | --- | --- |
| ``moe`` | backbone, FPN, experts | gate, head | yes: the fused FPN map |
| ``hypernet`` | backbone, FPN, hypernetwork | embedding, hidden block | yes: the fused FPN map |

``moe`` (``model.moe``): the hard-sharing FPN map feeds E expert decoders, and each task's head reads
its own per-sample gated mixture of them (MMoE). ``hypernet`` (``model.hypernet``): each task's head
is its own conv-BN-ReLU block and a 1x1 output convolution whose weight and bias a shared
hypernetwork generates from the task's learned embedding; the generator emits the largest task's
channel count and each task takes its first rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualhead.core.model import TaskOutputs
from dualhead.dense.config import DenseModelConfig
from dualhead.dense.models import ACTIVATIONS, DENSE_ARCHITECTURES, DenseHead, SharedBackboneModel
from dualhead.dense.tasks import HeadSpec
from dualhead.mtl.architectures import ConvHyperNetwork, FeaturePyramid, MultiGateExperts, conv_bn_relu


@DENSE_ARCHITECTURES.register("moe")
class MixtureOfExpertsModel(SharedBackboneModel):
    """Backbone and FPN shared, then a multi-gate mixture of experts: experts shared, one gate and one
    head per task. `gate_usage` gives each task's mean gate weights over the last batch."""

    def __init__(self, config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True):
        super().__init__(config, heads, pretrained)
        options = config.moe
        self.fpn = FeaturePyramid(self.backbone.channels, config.fpn_dim)
        try:
            self.experts = MultiGateExperts(config.fpn_dim, options.hidden, list(heads), options.experts, options.top_k)
        except ValueError as err:
            raise ValueError(f"model.moe: {err}") from None
        self.heads = nn.ModuleDict({name: DenseHead(options.hidden, config.head_dim, spec) for name, spec in heads.items()})

    def forward(self, images: Tensor) -> TaskOutputs:
        features = self.fpn(self.backbone(images))
        mixtures = self.experts(features)
        size = images.shape[-2:]
        return TaskOutputs(
            predictions={task: head(mixtures[task], size) for task, head in self.heads.items()},
            shared={self.representation_key: features},
        )

    @property
    def gate_usage(self) -> dict[str, list[float]]:
        """Each task's gate weight per expert, averaged over the last forward's batch."""
        return {task: weights.tolist() for task, weights in self.experts.gate_usage.items()}

    def shared_modules(self) -> list[nn.Module]:
        return [self.backbone, self.fpn, self.experts.experts]

    def task_modules(self, task: str) -> list[nn.Module]:
        return [self.experts.gates[task], self.heads[task]]


class GeneratedOutputHead(nn.Module):
    """A task's head whose 1x1 output convolution comes from a hypernetwork: conv-BN-ReLU (its own),
    the generated convolution in float32 (as `DenseHead`'s), the head's prior bias, upsampling,
    activation."""

    def __init__(self, in_channels: int, hidden: int, spec: HeadSpec):
        super().__init__()
        if spec.activation not in ACTIVATIONS:
            raise ValueError(f"unknown head activation {spec.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.block = conv_bn_relu(in_channels, hidden)
        self.prior = spec.bias  # a fixed offset: the generated bias starts near zero
        self.activation = ACTIVATIONS[spec.activation]()

    def forward(self, features: Tensor, weight: Tensor, bias: Tensor, size: Sequence[int]) -> Tensor:
        hidden = self.block(features)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = F.conv2d(hidden.float(), weight.float(), bias.float() + self.prior)
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            return self.activation(logits)


@DENSE_ARCHITECTURES.register("hypernet")
class HyperNetworkModel(SharedBackboneModel):
    """Backbone, FPN and a hypernetwork shared; each task owns an embedding and a hidden block, and
    its output convolution is generated from the embedding."""

    def __init__(self, config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True):
        super().__init__(config, heads, pretrained)
        options = config.hypernet
        self.fpn = FeaturePyramid(self.backbone.channels, config.fpn_dim)
        try:
            self.hypernetwork = ConvHyperNetwork(
                config.head_dim, {name: spec.channels for name, spec in heads.items()}, options.embedding_dim, options.hidden
            )
        except ValueError as err:
            raise ValueError(f"model.hypernet: {err}") from None
        self.heads = nn.ModuleDict(
            {name: GeneratedOutputHead(config.fpn_dim, config.head_dim, spec) for name, spec in heads.items()}
        )

    def forward(self, images: Tensor) -> TaskOutputs:
        features = self.fpn(self.backbone(images))
        size = images.shape[-2:]
        return TaskOutputs(
            predictions={task: head(features, *self.hypernetwork(task), size) for task, head in self.heads.items()},
            shared={self.representation_key: features},
        )

    def shared_modules(self) -> list[nn.Module]:
        return [self.backbone, self.fpn, self.hypernetwork.generator]

    def task_modules(self, task: str) -> list[nn.Module]:
        return [self.hypernetwork.embeddings[task], self.heads[task]]
