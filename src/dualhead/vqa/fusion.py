"""Fusion of image and question features into one shared representation.

`AttentionFusion` is the reference design's module; concat, product and gated exist for the
ablations. They map one pooled vector per image and per question (image [N, Dv], question [N, Dt])
to (fused [N, d], attention weights or None). A fusion with ``reads_tokens = True``
(`CrossAttentionFusion`) reads region tokens [N, R, Dv] and word states [N, L, Dt] instead (see
`VisionEncoder.regions` and `TextEncoder.token_states`) and returns the question's attention over
the regions [N, R] with the fused vector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dualhead.backbones.text import token_mask
from dualhead.core.registry import Registry

FUSIONS: Registry[type[nn.Module]] = Registry("fusion")


def feed_forward(hidden_dim: int, dropout: float) -> nn.Sequential:
    """A transformer block's position-wise feed-forward network (width 4d, GELU)."""
    return nn.Sequential(
        nn.Linear(hidden_dim, 4 * hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * hidden_dim, hidden_dim)
    )


def _check_heads(hidden_dim: int, num_heads: int) -> None:
    if hidden_dim % num_heads:
        raise ValueError(f"fusion hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")


class _Projected(nn.Module):
    """Projects both modalities to the common width d."""

    reads_tokens = False

    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, hidden_dim)
        self.text_proj = nn.Linear(text_dim, hidden_dim)
        self.out_dim = hidden_dim


@FUSIONS.register("attention")
class AttentionFusion(_Projected):
    """Project, stack as a 2-token sequence, multi-head self-attention, LayerNorm + residual,
    feed-forward (LayerNorm + residual), global average pool over the two tokens."""

    def __init__(
        self, image_dim: int, text_dim: int, hidden_dim: int = 256, num_heads: int = 4, dropout: float = 0.1, **_: object
    ):
        super().__init__(image_dim, text_dim, hidden_dim)
        _check_heads(hidden_dim, num_heads)
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(hidden_dim)
        self.feed_forward = feed_forward(hidden_dim, dropout)
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


class CoAttentionLayer(nn.Module):
    """Words attend to regions and regions to words (pre-norm, residual), then a feed-forward each."""

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.words_to_regions = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.regions_to_words = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.word_norm, self.region_norm = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.word_ff_norm, self.region_ff_norm = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.word_ff, self.region_ff = feed_forward(hidden_dim, dropout), feed_forward(hidden_dim, dropout)

    def forward(self, words: Tensor, regions: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        w, r = self.word_norm(words), self.region_norm(regions)
        words = words + self.words_to_regions(w, r, r, need_weights=False)[0]
        regions = regions + self.regions_to_words(r, w, w, key_padding_mask=padding, need_weights=False)[0]
        words = words + self.word_ff(self.word_ff_norm(words))
        return words, regions + self.region_ff(self.region_ff_norm(regions))


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(_Projected):
    """Co-attention between the image's regions and the question's words, in the spirit of ViLBERT's
    co-attention and MCAN: `layers` `CoAttentionLayer`s over projected region tokens (with learned
    positions) and word states, then the question (the mean of its words) attends over the regions;
    the fused vector mixes the question, what it attended to and their product. The pooling
    attention is what `dualhead explain` shows: it sums to one over the regions."""

    reads_tokens = True

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        hidden_dim: int = 256,
        num_heads: int = 4,
        dropout: float = 0.1,
        num_regions: int = 49,
        layers: int = 2,
        **_: object,
    ):
        super().__init__(image_dim, text_dim, hidden_dim)
        _check_heads(hidden_dim, num_heads)
        if layers < 1:
            raise ValueError(f"model.fusion_layers must be at least 1 for cross_attention, got {layers}")
        self.region_positions = nn.Parameter(torch.zeros(1, num_regions, hidden_dim))
        nn.init.trunc_normal_(self.region_positions, std=0.02)
        self.layers = nn.ModuleList(CoAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(layers))
        self.region_norm, self.word_norm = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.pool = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.mix = nn.Sequential(nn.Linear(3 * hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, regions: Tensor, words: Tensor) -> tuple[Tensor, Tensor]:
        if regions.shape[1] != self.region_positions.shape[1]:
            raise ValueError(
                f"cross_attention fusion was built for {self.region_positions.shape[1]} image regions, got "
                f"{regions.shape[1]}: the image size differs from the model's"
            )
        present = token_mask(words)
        if not torch.onnx.is_in_onnx_export():  # padding is at the end: drop it (an exported graph keeps it)
            length = max(int(present.sum(dim=1).max()), 1)
            words, present = words[:, :length], present[:, :length]
        regions = self.image_proj(regions) + self.region_positions
        words = self.text_proj(words)
        for layer in self.layers:
            words, regions = layer(words, regions, ~present)
        words, regions = self.word_norm(words), self.region_norm(regions)
        weight = present.unsqueeze(-1).to(words.dtype)
        question = (words * weight).sum(1) / weight.sum(1).clamp(min=1)
        attended, attention = self.pool(question.unsqueeze(1), regions, regions, need_weights=True, average_attn_weights=True)
        attended = attended.squeeze(1)
        return self.mix(torch.cat([question, attended, question * attended], dim=-1)), attention.squeeze(1)


def build_fusion(
    name: str, image_dim: int, text_dim: int, hidden_dim: int, num_heads: int, dropout: float, **options: object
) -> nn.Module:
    """Build a fusion module by name; `options` (num_regions, layers) reach the fusions that take them."""
    return FUSIONS.build(name, image_dim, text_dim, hidden_dim=hidden_dim, num_heads=num_heads, dropout=dropout, **options)
