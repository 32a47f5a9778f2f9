"""Fusion of one image vector and one question vector into one shared representation.

`AttentionFusion` is the reference design's module; the others exist for the ablations. Every
fusion maps (image [N, Dv], question [N, Dt]) to (fused [N, d], attention weights or None).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dualhead.core.registry import Registry

FUSIONS: Registry[type[nn.Module]] = Registry("fusion")


class _Projected(nn.Module):
    """Projects both modalities to the common width d."""

    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, hidden_dim)
        self.text_proj = nn.Linear(text_dim, hidden_dim)
        self.out_dim = hidden_dim


@FUSIONS.register("attention")
class AttentionFusion(_Projected):
    """Project, stack as a 2-token sequence, multi-head self-attention, LayerNorm + residual,
    feed-forward (LayerNorm + residual), global average pool over the two tokens."""

    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int = 256, num_heads: int = 4, dropout: float = 0.1):
        super().__init__(image_dim, text_dim, hidden_dim)
        if hidden_dim % num_heads:
            raise ValueError(f"fusion hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(hidden_dim)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_dim, 4 * hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(4 * hidden_dim, hidden_dim),
        )
        self.feed_forward_norm = nn.LayerNorm(hidden_dim)

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        tokens = torch.stack([self.image_proj(image), self.text_proj(text)], dim=1)  # [N, 2, d]
        attended, weights = self.attention(tokens, tokens, tokens, need_weights=True, average_attn_weights=True)
        tokens = self.attention_norm(tokens + attended)
        tokens = self.feed_forward_norm(tokens + self.feed_forward(tokens))
        return tokens.mean(dim=1), weights  # weights: [N, 2, 2], rows = queries (image, question)


@FUSIONS.register("concat")
class ConcatFusion(_Projected):
    """Concatenate the projections and mix them with one layer (the 'no attention' ablation)."""

    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1, **_: object):
        super().__init__(image_dim, text_dim, hidden_dim)
        self.mix = nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, None]:
        return self.mix(torch.cat([self.image_proj(image), self.text_proj(text)], dim=-1)), None


@FUSIONS.register("product")
class ProductFusion(_Projected):
    """Element-wise product of the projections (bilinear pooling of rank one)."""

    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1, **_: object):
        super().__init__(image_dim, text_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, None]:
        return self.dropout(self.norm(torch.tanh(self.image_proj(image)) * torch.tanh(self.text_proj(text)))), None


@FUSIONS.register("gated")
class GatedFusion(_Projected):
    """A learned sigmoid gate mixes the two projections per feature."""

    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1, **_: object):
        super().__init__(image_dim, text_dim, hidden_dim)
        self.gate = nn.Linear(2 * hidden_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, None]:
        image, text = torch.tanh(self.image_proj(image)), torch.tanh(self.text_proj(text))
        gate = torch.sigmoid(self.gate(torch.cat([image, text], dim=-1)))
        return self.dropout(self.norm(gate * image + (1 - gate) * text)), None


def build_fusion(name: str, image_dim: int, text_dim: int, hidden_dim: int, num_heads: int, dropout: float) -> nn.Module:
    """Build a fusion module by name."""
    return FUSIONS.build(name, image_dim, text_dim, hidden_dim=hidden_dim, num_heads=num_heads, dropout=dropout)
