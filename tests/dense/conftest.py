"""Fixtures of the dense tests: tiny scenes in a temporary cache, and a tiny dense run config."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualhead.backbones.config import VisionConfig
from dualhead.dense.config import DenseDataConfig, DenseModelConfig, ScenesRunConfig

# Normalisation of the tests' datasets (EfficientNet-Lite0's mean and std).
DATA_CONFIG = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


@pytest.fixture(scope="session")
def scenes_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scenes")


def tiny_dense_config(cache: Path, output_dir: Path, **data_changes) -> ScenesRunConfig:
    """A random-initialised tiny backbone on 32x32 scenes: a few steps take a second or two."""
    config = ScenesRunConfig(
        model=DenseModelConfig(
            backbone=VisionConfig(name="mobilenetv3_small_050", weights="none", norm_eval=False), fpn_dim=16, head_dim=16
        ),
        data=DenseDataConfig(root=str(cache), image_size=32, train_size=24, val_size=8, test_size=8, batch_size=8),
        output_dir=str(output_dir),
        name="run",
    )
    for key, value in data_changes.items():
        setattr(config.data, key, value)
    config.train.epochs = 2
    config.train.progress = False
    config.train.precision = "fp32"
    config.train.log_every_steps = 1
    config.train.diagnostics_every_steps = 2
    return config


def assert_a_dozen_steps_lower_every_loss(trainer, tasks) -> None:
    """Twelve steps on one batch bring each task's loss below 80% of its first value."""
    batch = next(iter(trainer.experiment.train_loader()))
    first = trainer.train_step(batch).losses
    for _ in range(10):
        trainer.train_step(batch)
    last = trainer.train_step(batch).losses
    for task in tasks:
        assert last[task] < 0.8 * first[task], (task, first[task], last[task])
