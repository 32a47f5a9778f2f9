"""Multi-gate mixture of experts (MMoE; Ma et al., KDD 2018) over a shared feature map.

Every task reads the same expert decoders (small conv blocks) through its own gate: a softmax over
the experts computed from the globally pooled shared features, so each sample gets its own
mixture per task. The experts serve every task (shared); a task's gate is its own. Optional top-k
routing (Shazeer et al., 2017) keeps each sample's k highest gate logits and renormalises over them,
so the other experts get neither weight nor gradient from that sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualhead.mtl.architectures.pyramid import conv_bn_relu


class ExpertGate(nn.Module):
    """One task's gate: ``[B, C, H, W] -> [B, experts]`` softmax weights from the pooled features."""

    def __init__(self, in_channels: int, experts: int, top_k: int | None = None):
        super().__init__()
        self.linear = nn.Linear(in_channels, experts)
        # Near the even mixture at first; the small random part breaks top-k's ties differently per sample.
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)
        self.top_k = top_k

    def forward(self, features: Tensor) -> Tensor:
        logits = self.linear(features.mean(dim=(2, 3)).float())
        if self.top_k is not None and self.top_k < logits.shape[1]:
            kept = logits.topk(self.top_k, dim=1).indices
            mask = torch.full_like(logits, float("-inf")).scatter(1, kept, 0.0)
            logits = logits + mask
        return F.softmax(logits, dim=1)


class MultiGateExperts(nn.Module):
    """``forward(features) -> {task: [B, hidden, H, W] mixture}``: `experts` conv-BN-ReLU blocks over
    `in_channels`-channel maps, mixed per sample by each task's gate.

    ``experts`` is shared by the tasks, ``gates[task]`` is one task's. `gate_usage` holds, after each
    forward, every task's gate weights averaged over the batch (which experts it routes to).
    """

    def __init__(self, in_channels: int, hidden: int, tasks: Sequence[str], experts: int, top_k: int | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("a mixture of experts needs at least one task")
        if experts < 1:
            raise ValueError(f"a mixture of experts needs at least one expert, got {experts}")
        if top_k is not None and not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in 1..{experts} (the number of experts) or null, got {top_k}")
        self.experts = nn.ModuleList(
            nn.Sequential(conv_bn_relu(in_channels, hidden), conv_bn_relu(hidden, hidden)) for _ in range(experts)
        )
        self.gates = nn.ModuleDict({task: ExpertGate(in_channels, experts, top_k) for task in tasks})
        self.gate_usage: dict[str, Tensor] = {}

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        outputs = torch.stack([expert(features) for expert in self.experts], dim=1)  # [B, E, hidden, H, W]
        mixtures = {}
        for task, gate in self.gates.items():
            weights = gate(features)
            self.gate_usage[task] = weights.detach().mean(dim=0)
            mixtures[task] = (weights.to(outputs.dtype)[:, :, None, None, None] * outputs).sum(dim=1)
        return mixtures
