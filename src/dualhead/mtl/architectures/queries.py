"""Multi-decoder transformer: one shared token sequence, one transformer decoder per task, each with its
own learned queries (DETR's decoder, Carion et al. 2020, once per task).

`TaskQueryDecoders` holds, per task, an ``nn.TransformerDecoder`` and its query embeddings; every
task reads the same memory (the shared encoder's tokens plus a fixed positional encoding), so the
encoder is what the tasks share and each decoder with its queries is a task's own. `SetHead` turns a
task's query outputs into a set prediction: class logits and coordinates in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def sine_position_encoding(height: int, width: int, dim: int, device: torch.device | None = None) -> Tensor:
    """DETR's fixed 2D sine encoding of a ``height x width`` grid as ``[height * width, dim]`` (row-major):
    half the channels encode the row, half the column, at geometrically spaced frequencies."""
    if dim % 4:
        raise ValueError(f"the positional encoding needs a dimension divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    row_angles = rows[:, None] * frequencies[None]  # [H, dim / 4]
    col_angles = cols[:, None] * frequencies[None]  # [W, dim / 4]
    row_code = torch.cat([row_angles.sin(), row_angles.cos()], dim=1)[:, None].expand(height, width, dim // 2)
    col_code = torch.cat([col_angles.sin(), col_angles.cos()], dim=1)[None].expand(height, width, dim // 2)
    return torch.cat([row_code, col_code], dim=-1).reshape(height * width, dim)


class QueryDecoder(nn.Module):
    """One task's decoder: `num_queries` learned queries attend to the memory through `layers`
    pre-norm transformer decoder layers; ``[B, N, dim] -> [B, num_queries, dim]``."""

    def __init__(
        self, dim: int, num_queries: int, layers: int, heads: int, feedforward: int, dropout: float = 0.0
    ):
        super().__init__()
        if num_queries < 1 or layers < 1:
            raise ValueError(
                f"a query decoder needs at least one query and one layer, got {num_queries} and {layers}"
            )
        if dim % heads:
            raise ValueError(f"the decoder dimension {dim} must be divisible by its {heads} attention heads")
        self.queries = nn.Embedding(num_queries, dim)
        layer = nn.TransformerDecoderLayer(
            dim, heads, feedforward, dropout=dropout, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(dim))

    def forward(self, memory: Tensor) -> Tensor:
        queries = self.queries.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        return self.decoder(queries.to(memory.dtype), memory)


class TaskQueryDecoders(nn.Module):
    """A `QueryDecoder` per task over one shared memory; ``memory -> {task: [B, queries[task], dim]}``.

    Nothing here is shared: each decoder and its queries belong to one task (``tasks[name]``)."""

    def __init__(
        self,
        dim: int,
        queries: Mapping[str, int],
        layers: int,
        heads: int,
        feedforward: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.tasks = nn.ModuleDict(
            {
                task: QueryDecoder(dim, count, layers, heads, feedforward, dropout)
                for task, count in queries.items()
            }
        )

    def forward(self, memory: Tensor) -> dict[str, Tensor]:
        return {task: decoder(memory) for task, decoder in self.tasks.items()}


class SetHead(nn.Module):
    """Per query: `num_logits` class logits and `num_coordinates` coordinates in [0, 1] (a 3-layer MLP
    and a sigmoid, as DETR's box head), concatenated as ``[B, Q, num_logits + num_coordinates]``.

    It runs in float32 even under bf16 autocast: a bf16 coordinate in [0, 1] is only good to 1/256."""

    def __init__(self, dim: int, num_logits: int, num_coordinates: int):
        super().__init__()
        self.classifier = nn.Linear(dim, num_logits)
        self.coordinates = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_coordinates)
        )

    def forward(self, queries: Tensor) -> Tensor:
        with torch.autocast(queries.device.type, enabled=False):
            queries = queries.float()
            return torch.cat([self.classifier(queries), self.coordinates(queries).sigmoid()], dim=-1)
