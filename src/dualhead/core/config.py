"""One configuration tree per run: dataclasses, loaded from YAML, overridden by ``key=value``.

The core owns what every run has (`TrainConfig`, `RunConfig`); an application subclasses
`RunConfig` with its own ``model`` and ``data`` sections (and may extend ``train``). The YAML's
``application`` key picks the class. Run configs ship inside the package (`dualhead/configs/*.yaml`)
and can be named without a path: ``dualhead train vqa_rad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dualhead.core.applications import DEFAULT_APPLICATION, get_application
from dualhead.core.io import atomic_write_text


@dataclass
class TrainConfig:
    """The optimisation recipe every application shares."""

    epochs: int = 6
    max_steps: int | None = None  # stop after this many optimiser steps (tests, smoke runs)
    lr: float = 1e-3  # new layers (fusion, heads, decoders)
    encoder_lr: float = 1e-4  # pretrained modules
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    # Validate, keep best/ and score with an exponential moving average of the weights (e.g. 0.999:
    # about the last 1,000 steps; dualhead.core.ema); null: the weights themselves.
    ema_decay: float | None = None
    balancer: str = "fixed"  # see dualhead.mtl.balancers.BALANCERS
    balancer_options: dict[str, Any] = field(default_factory=dict)
    # auto: bf16 autocast where the device computes bf16 natively (CUDA, CPUs with AVX512-BF16 or
    # AMX), fp32 elsewhere (on an AVX2-only CPU bf16 is emulated, many times slower) | bf16 | fp32
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    early_stopping_patience: int | None = 3
    metric: str | None = None  # validation metric that picks `best/`; null: the application's default
    # At the application's stage boundary (VQA: the end of the frozen warm-up), "continue" the one
    # cosine schedule, or "restart" it with new layers peaking at `finetune_lr` (default: `lr`).
    finetune_schedule: str = "continue"  # continue | restart
    finetune_lr: float | None = None
    log_every_steps: int = 20
    # Every this many steps, log per-task gradient norms and their cosine at the shared parameters.
    diagnostics_every_steps: int | None = 50
    checkpoint_every_steps: int | None = 200  # `last/` mid-epoch too, so a killed run loses little
    progress: bool = True


@dataclass
class RunConfig:
    """What every run has; applications add ``model`` and ``data`` (see `dualhead.core.applications`)."""

    application: str = DEFAULT_APPLICATION
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    name: str | None = None  # run directory name; default: <format>-<timestamp>


class ConfigError(ValueError):
    """A config file or override that does not fit the configuration tree."""


BUNDLED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = "easy_vqa"


def bundled_configs() -> list[str]:
    return sorted(path.stem for path in BUNDLED_CONFIGS.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML file path, or the name of a bundled config (`easy_vqa`, `vqa_rad`, `scenes`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = BUNDLED_CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    raise ConfigError(f"config file not found: {path} (bundled configs: {', '.join(bundled_configs())})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, checked against the tree
    of the application the YAML (or an ``application=`` override) names."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=20)")
    where = ""
    layers = []
    if path is not None:
        path = resolve_config_path(path)
        where = f" in {path}"
        try:
            layers.append(OmegaConf.load(path))
        except (OmegaConfBaseException, ValueError) as err:  # YAML syntax errors are ValueErrors
            raise ConfigError(f"cannot read {path}: {err}") from err
        if not OmegaConf.is_dict(layers[0]):
            raise ConfigError(f"{path} must hold a mapping of sections (model, data, train), not a list")
    if overrides:
        layers.append(_merge(OmegaConf.create(), [OmegaConf.from_dotlist(list(overrides))], where))
    name = DEFAULT_APPLICATION
    for layer in layers:
        name = layer.get("application", name)
    try:
        config_class = get_application(str(name)).config_class
    except ValueError as err:
        raise ConfigError(f"{err}{where}") from None
    return _to_object(_merge(OmegaConf.structured(config_class), layers, where), where)


def with_overrides(config: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A copy of `config` with ``key=value`` overrides applied, checked against the tree."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=20)")
    merged = OmegaConf.structured(config)
    if overrides:
        merged = _merge(merged, [OmegaConf.from_dotlist(list(overrides))], "")
    return _to_object(merged, "")


def _to_object(merged: Any, where: str) -> RunConfig:
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
    """Write the resolved config as YAML (what the run actually used), atomically."""
    atomic_write_text(Path(path), OmegaConf.to_yaml(OmegaConf.structured(config)))
