"""Multi-scale vision backbones: a timm model's feature maps at several strides, for dense heads.

Built with ``timm.create_model(arch, features_only=True, out_indices=...)``. Weights resolve as for
the pooled encoder (`dualhead.backbones.vision`): the full model is built with its weights (offline
EfficientNet-Lite0, a local file, the hub) and its tensors copied into the feature extractor by
name. The feature extractor holds the same modules minus those after its last level (the
classifier, and EfficientNet's and MobileNetV3's final 1x1 conv), under the same names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
from torch import Tensor, nn

from dualhead.backbones.config import VisionConfig
from dualhead.backbones.freeze import NormEvalModule, freeze_module
from dualhead.backbones.vision import _create_timm_model, _timm_arch, timm_kwargs

#: Strides 4, 8, 16 and 32 for most timm CNNs (index 0 is stride 2).
DEFAULT_OUT_INDICES = (1, 2, 3, 4)


class FeatureBackbone(NormEvalModule):
    """``[N, 3, H, W] -> [N, channels[i], H / reductions[i], W / reductions[i]]`` for each level, finest first."""

    def __init__(self, model: nn.Module, data_config: dict[str, Any], norm_eval: bool = False):
        super().__init__()
        self.model = model
        self.norm_eval = norm_eval
        self.data_config = data_config
        self.channels: list[int] = model.feature_info.channels()
        self.reductions: list[int] = model.feature_info.reduction()
        # Swin's stages give [N, H, W, C]; the levels are returned as [N, C, H, W] whatever the model.
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        levels = self.model(pixel_values)
        if self.channels_last_output:
            return [x.permute(0, 3, 1, 2) for x in levels]
        return levels



def backbone_data_config(cfg: VisionConfig) -> dict[str, Any]:
    """The preprocessing (mean, std, input size) that `cfg`'s backbone expects, without building it."""
    pretrained_cfg = timm.models.get_pretrained_cfg(_timm_arch(cfg.name))
    return timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})


def build_feature_backbone(cfg: VisionConfig, out_indices: Sequence[int] = DEFAULT_OUT_INDICES) -> FeatureBackbone:
    """The multi-scale backbone `cfg` describes: any timm CNN by name, its weights resolved, frozen if asked."""
    arch = _timm_arch(cfg.name)
    try:
        model = timm.create_model(
            arch, pretrained=False, features_only=True, out_indices=tuple(out_indices), **timm_kwargs(cfg, arch)
        )
    except (RuntimeError, ValueError, AssertionError, IndexError) as err:
        raise ValueError(f"cannot build {cfg.name!r} as a multi-scale backbone with out_indices {list(out_indices)}: {err}") from err
    if cfg.weights != "none":
        _copy_by_name(_create_timm_model(cfg, arch), model, f"{cfg.name} weights {cfg.weights!r}")
    backbone = FeatureBackbone(model, backbone_data_config(cfg), norm_eval=cfg.norm_eval)
    return freeze_module(backbone) if cfg.freeze else backbone


def _copy_by_name(source: nn.Module, target: nn.Module, origin: str) -> None:
    """Load `source`'s tensors into the feature extractor `target`. timm's generic feature wrapper
    flattens the first two levels of nested names (``stages.3.x`` -> ``stages_3.x``); both forms match."""
    tensors: dict[str, Tensor] = {}
    for key, value in source.state_dict().items():
        tensors[key] = value
        first, _, rest = key.partition(".")
        second, _, tail = rest.partition(".")
        if tail:
            tensors.setdefault(f"{first}_{second}.{tail}", value)
    wanted = target.state_dict()
    missing = [key for key in wanted if key not in tensors]
    if missing:
        raise ValueError(f"{origin}: no tensor for {len(missing)} of the backbone's, e.g. {', '.join(missing[:5])}")
    try:
        target.load_state_dict({key: tensors[key] for key in wanted})
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{origin} do not fit the multi-scale backbone: {err}") from err
