"""Experts per question type: small residual MLPs between the fusion and the heads, mixed by a gate
that reads the question alone.

``h' = h + sum_k g_k(q) * expert_k(h)``, with g a softmax over the experts (soft routing: every
expert runs, so the mixture is differentiable and exports to ONNX as a plain graph). With
``route: question_type`` the gate is a classifier of the training split's question types, taught by
an auxiliary cross-entropy (`type_loss`); with ``route: learned`` it is unsupervised, and the
importance loss of Shazeer et al. ("Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", ICLR 2017, eq. 6) keeps it from sending everything to one expert
(`importance_loss`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dualhead.vqa.config import ExpertsConfig
from dualhead.vqa.data.batching import IGNORE
from dualhead.vqa.heads import mlp_head


class QuestionExperts(nn.Module):
    """K expert MLPs over the fused representation and the gate that mixes them."""

    def __init__(self, hidden_dim: int, question_dim: int, num_experts: int, config: ExpertsConfig):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"experts need at least one expert, got {num_experts}")
        self.gate = mlp_head([question_dim, config.gate_hidden], num_experts, config.dropout)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden_dim),
                nn.Linear(hidden_dim, config.hidden),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden, hidden_dim),
            )
            for _ in range(num_experts)
        )

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, fused: Tensor, question: Tensor) -> tuple[Tensor, Tensor]:
        """(the mixed representation [B, d], the gate's logits [B, K]) for fused features [B, d] and
        pooled question features [B, Dt]."""
        gate_logits = self.gate(question)
        gates = gate_logits.float().softmax(-1).to(fused.dtype)
        outputs = torch.stack([expert(fused) for expert in self.experts], dim=1)  # [B, K, d]
        return fused + (gates.unsqueeze(-1) * outputs).sum(1), gate_logits


def type_loss(gate_logits: Tensor, type_target: Tensor) -> Tensor:
    """Cross-entropy of the type classifier over the questions with a known type, averaged over the
    whole batch (rows without a type, or with one unseen in training, add zero), so that it is a
    per-question mean like the router's loss."""
    losses = nn.functional.cross_entropy(
        gate_logits.float(), type_target, ignore_index=IGNORE, reduction="none"
    )
    return losses.sum() / max(type_target.numel(), 1)


def importance_loss(gate_logits: Tensor) -> Tensor:
    """CV(importance)^2, importance_k = the batch's summed gate value of expert k (Shazeer et al., 2017):
    zero when the experts receive equal shares."""
    importance = gate_logits.float().softmax(-1).sum(0)
    if importance.numel() < 2:
        return importance.new_zeros(())
    return importance.var(correction=0) / importance.mean().square().clamp_min(1e-12)
