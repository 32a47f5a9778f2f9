"""Hypernetwork-generated task layers (Ha, Dai and Le, 2016; task-conditioned generation as in
HyperFormer, Mahabadi et al., ACL 2021).

Each task owns only a learned embedding; one small network shared by every task maps an embedding
to the weight and bias of that task's 1x1 output convolution. Tasks differ in output channels: the
generator emits weights for the largest channel count and each task takes its first ``channels``
rows (a task with fewer channels leaves the remaining rows unused, so they learn only from the
tasks with more). The final layer's bias is the generated layer's starting point (a standard conv
initialisation) and its weight starts small, so generation begins near an ordinary initialised conv
and the embeddings move each task away from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn


class TaskEmbedding(nn.Module):
    """One task's learned embedding (a module, so a model can declare it the task's own)."""

    def __init__(self, dim: int):
        super().__init__()
        self.vector = nn.Parameter(torch.randn(dim) / math.sqrt(dim))


class ConvHyperNetwork(nn.Module):
    """``forward(task) -> (weight [C_task, in, 1, 1], bias [C_task])`` of `task`'s 1x1 convolution.

    ``embeddings[task]`` is the task's own; ``generator`` is shared by every task.
    """

    def __init__(self, in_channels: int, out_channels: Mapping[str, int], embedding_dim: int, hidden: int):
        super().__init__()
        if not out_channels:
            raise ValueError("a hypernetwork needs at least one task")
        if embedding_dim < 1 or hidden < 1:
            raise ValueError(f"embedding_dim and hidden must be >= 1, got {embedding_dim} and {hidden}")
        bad = {task: c for task, c in out_channels.items() if c < 1}
        if bad:
            raise ValueError(f"every task needs at least one output channel, got {bad}")
        self.in_channels = in_channels
        self.out_channels = dict(out_channels)
        self.max_channels = max(out_channels.values())
        self.embeddings = nn.ModuleDict({task: TaskEmbedding(embedding_dim) for task in out_channels})
        last = nn.Linear(hidden, self.max_channels * (in_channels + 1))
        bound = 1.0 / math.sqrt(in_channels)  # nn.Conv2d's default initialisation range
        nn.init.uniform_(last.bias, -bound, bound)
        nn.init.normal_(last.weight, std=0.1 * bound / math.sqrt(hidden))
        self.generator = nn.Sequential(nn.Linear(embedding_dim, hidden), nn.ReLU(inplace=True), last)

    def forward(self, task: str) -> tuple[Tensor, Tensor]:
        if task not in self.embeddings:
            raise ValueError(f"unknown task {task!r}; this hypernetwork generates {', '.join(self.embeddings)}")
        params = self.generator(self.embeddings[task].vector).view(self.max_channels, self.in_channels + 1)
        channels = self.out_channels[task]
        weight, bias = params[:channels, :-1], params[:channels, -1]
        return weight[:, :, None, None], bias
