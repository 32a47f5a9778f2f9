"""A timm multi-scale backbone run one output level at a time.

Cross-stitch and sluice networks mix their columns' activations between levels, so they cannot call
a backbone's forward once. `BackboneStages` cuts the module chain of a timm ``features_only`` model
after each level it outputs: timm's generic wrappers (`FeatureListNet`, `FeatureDictNet`: ResNets,
RegNets, and most CNNs) and its EfficientNet and MobileNetV3 feature models. Running the stages in
turn gives the model's own outputs (a test checks it).
"""

from __future__ import annotations

from timm.models import FeatureDictNet  # FeatureListNet subclasses it
from torch import Tensor, nn


class BackboneStages:
    """Stage ``i`` maps level ``i - 1``'s output (stage 0: the image) to level ``i``.

    Holds references to the backbone's modules and registers none of them (the backbone owns them,
    so its state dict, device moves and train/eval modes apply as usual).
    """

    def __init__(self, model: nn.Module):
        self.stages = split_into_stages(model)

    def __len__(self) -> int:
        return len(self.stages)

    def run(self, stage: int, x: Tensor) -> Tensor:
        for module in self.stages[stage]:
            x = module(x)
        return x


def split_into_stages(model: nn.Module) -> list[list[nn.Module]]:
    """The modules of a timm ``features_only`` model in the order they run, cut after each output level."""
    if isinstance(model, FeatureDictNet):
        chain = list(model.items())
        outputs = {index for index, (name, _) in enumerate(chain) if name in model.return_layers}
        chain_modules = [module for _, module in chain]
    elif (
        hasattr(model, "blocks")
        and hasattr(model, "_stage_out_idx")
        and getattr(model, "feature_hooks", None) is None
    ):
        # timm's EfficientNetFeatures / MobileNetV3Features: a stem, then `blocks`; level k is the
        # stem's output (k = 0) or block k - 1's.
        stem = [module for name, module in model.named_children() if name != "blocks"]
        chain_modules = stem + list(model.blocks)
        outputs = {len(stem) + k - 1 for k in model._stage_out_idx}
    else:
        raise ValueError(
            f"cannot run {type(model).__name__} level by level: cross-stitch and sluice networks need a "
            "backbone timm builds as FeatureListNet or as EfficientNet / MobileNetV3 features (most CNNs)"
        )
    stages, current = [], []
    for index, module in enumerate(chain_modules):
        current.append(module)
        if index in outputs:
            stages.append(current)
            current = []
    expected = len(model.feature_info.out_indices)
    if len(stages) != expected:
        raise ValueError(f"{type(model).__name__}: found {len(stages)} output stages, expected {expected}")
    return stages
