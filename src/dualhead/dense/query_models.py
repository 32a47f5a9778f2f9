"""The dense registration of the multi-decoder transformer (``task_queries``; the reference's Sketch 2).

A shared encoder turns the image into tokens: any timm backbone `build_feature_backbone` supports
(a CNN's last level of ``model.out_indices``, or a ViT's patch tokens, which timm returns as a map),
a 1x1 projection to ``model.queries.dim`` channels, flattened to ``[B, h * w, dim]``. Each task then
has its own transformer decoder and learned queries (`dualhead.mtl.architectures.queries`) reading
those tokens plus a fixed 2D sine positional encoding, and its own head:

- set tasks (detection, keypoints): ``model.queries.num_queries`` queries and a `SetHead` (class
  logits and coordinates per query);
- dense tasks (seg, depth, normals): one query per output channel, used as in mask classification
  (MaskFormer): the task's own per-pixel embedding of the token map (conv-BN-ReLU) is dotted with
  each query's output to give that channel, at the token map's stride (16 for a ViT-B/16, 32 for a
  CNN's last level), upsampled to the input. Maps this coarse suit the set tasks this architecture is
  for better than per-pixel tasks; ``hard_fpn`` and its relatives decode finer.

| architecture | shared: gradient methods act here | a task's own | representation shared by tasks |
| --- | --- | --- | --- |
| ``task_queries`` | backbone, token projection | decoder and queries, head | yes: the tokens |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualhead.core.model import TaskOutputs
from dualhead.dense.config import DenseModelConfig
from dualhead.dense.models import ACTIVATIONS, DENSE_ARCHITECTURES, SharedBackboneModel
from dualhead.dense.tasks import HeadSpec
from dualhead.mtl.architectures import SetHead, TaskQueryDecoders, conv_bn_relu, sine_position_encoding


class QueryMapHead(nn.Module):
    """A dense task's head over its queries: channel c at a pixel is the dot product of the pixel's
    embedding (this task's conv-BN-ReLU over the token map) with query c's projected output, plus a
    bias, then upsampled to the input and passed through the task's activation (in float32)."""

    def __init__(self, dim: int, hidden: int, spec: HeadSpec):
        super().__init__()
        if spec.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown head activation {spec.activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        self.pixels = conv_bn_relu(dim, hidden)
        self.kernels = nn.Linear(dim, hidden)
        self.bias = nn.Parameter(torch.full((spec.channels,), float(spec.bias)))
        self.activation = ACTIVATIONS[spec.activation]()

    def forward(self, token_map: Tensor, queries: Tensor, size: Sequence[int]) -> Tensor:
        pixels = self.pixels(token_map)
        with torch.autocast(pixels.device.type, enabled=False):
            kernels = self.kernels(queries.float())  # [B, channels, hidden]
            logits = torch.einsum("bdhw,bcd->bchw", pixels.float(), kernels) + self.bias.view(1, -1, 1, 1)
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            return self.activation(logits)


@DENSE_ARCHITECTURES.register("task_queries")
class TaskQueryModel(SharedBackboneModel):
    """A shared encoder (backbone and token projection) and, per task, a transformer decoder with its
    own learned queries and a head (``model.queries``)."""

    supports_set_tasks = True

    def __init__(self, config: DenseModelConfig, heads: Mapping[str, HeadSpec], pretrained: bool = True):
        super().__init__(config, heads, pretrained)
        options = config.queries
        if options.dim % 4:
            raise ValueError(
                f"model.queries.dim must be divisible by 4 (the positional encoding), got {options.dim}"
            )
        self.projection = nn.Conv2d(self.backbone.channels[-1], options.dim, 1)
        counts = {
            task: options.num_queries if spec.kind == "set" else spec.channels for task, spec in heads.items()
        }
        try:
            self.decoders = TaskQueryDecoders(
                options.dim, counts, options.layers, options.heads, options.feedforward, options.dropout
            )
        except ValueError as err:
            raise ValueError(f"model.queries: {err}") from None
        self.heads = nn.ModuleDict(
            {
                task: SetHead(options.dim, spec.channels, spec.coordinates)
                if spec.kind == "set"
                else QueryMapHead(options.dim, config.head_dim, spec)
                for task, spec in heads.items()
            }
        )

    def forward(self, images: Tensor) -> TaskOutputs:
        level = self.projection(self.backbone(images)[-1])
        batch, dim, height, width = level.shape
        tokens = level.flatten(2).transpose(1, 2)  # [B, h * w, dim]: what every task reads
        position = sine_position_encoding(height, width, dim, device=tokens.device)
        queries = self.decoders(tokens + position.to(tokens.dtype))
        token_map = tokens.transpose(1, 2).reshape(batch, dim, height, width)
        size = images.shape[-2:]
        predictions = {
            task: head(queries[task]) if isinstance(head, SetHead) else head(token_map, queries[task], size)
            for task, head in self.heads.items()
        }
        return TaskOutputs(predictions=predictions, shared={self.representation_key: tokens})

    def shared_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projection]

    def task_modules(self, task: str) -> list[nn.Module]:
        return [self.decoders.tasks[task], self.heads[task]]
