"""Backbones shared by every application: timm vision models (pooled or multi-scale) and text encoders."""
