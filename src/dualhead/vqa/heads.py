"""Task heads: the yes/no head, the open-ended answer head, and the question-type router."""

from __future__ import annotations

from torch import nn


def mlp_head(widths: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    """Blocks of Linear, LayerNorm, GELU, Dropout through `widths`, then a Linear classifier."""
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(width_in, width_out), nn.LayerNorm(width_out), nn.GELU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def binary_head(hidden_dim: int, dropout: float, deep: bool = False) -> nn.Sequential:
    """d -> d/2 -> 64 -> 2 (reference); the deep variant: d -> d -> d/2 -> d/4 -> 2."""
    widths = [hidden_dim, hidden_dim, hidden_dim // 2, hidden_dim // 4] if deep else [hidden_dim, hidden_dim // 2, 64]
    return mlp_head(widths, 2, dropout)


def open_head(hidden_dim: int, num_answers: int, dropout: float, deep: bool = False) -> nn.Sequential:
    """d -> d -> d/2 -> N (reference); the deep variant adds one more d -> d block."""
    widths = [hidden_dim, hidden_dim, hidden_dim, hidden_dim // 2] if deep else [hidden_dim, hidden_dim, hidden_dim // 2]
    return mlp_head(widths, num_answers, dropout)


def router_head(text_dim: int, dropout: float) -> nn.Sequential:
    """Predicts from the question alone whether it is a yes/no question (logits: [open, binary])."""
    return mlp_head([text_dim, 128], 2, dropout)
