"""Shared fixtures: tiny random-initialised encoders and a small VQA dataset written on the fly."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from dualhead.backbones.config import TextConfig, VisionConfig
from dualhead.vqa.config import ModelConfig, VQARunConfig

# The real VQA-RAD copy lives in shared/ beside the repository (DUALHEAD_VQA_RAD overrides).
VQA_RAD_ROOT = Path(os.environ.get("DUALHEAD_VQA_RAD", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vqa_rad"))

# Tests run small models; one thread avoids oversubscribing the two shared cores.
torch.set_num_threads(1)

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ("circle", "square")


def tiny_model_config(**changes) -> ModelConfig:
    """A model small enough to train for a few steps in a test (random weights, 32x32 input)."""
    config = ModelConfig(
        vision=VisionConfig(name="mobilenetv3_small_050", weights="none", image_size=32),
        text=TextConfig(name="distilbert", num_layers=1, hidden_size=32, max_length=16),
        hidden_dim=32,
        num_heads=4,
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def draw_shape(path: Path, shape: str, color: str, size: int = 32) -> None:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (6, 6, size - 6, size - 6)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    image.save(path)


def write_shapes_dataset(root: Path, images_per_split: dict[str, int], seed: int = 0) -> Path:
    """A jsonl dataset in the plain format: coloured shapes, yes/no and open questions about them."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in images_per_split.items():
        rows = []
        for i in range(count):
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            name = f"images/{split}_{i}.png"
            draw_shape(root / name, shape, color)
            asked = rng.choice(SHAPES)
            rows += [
                {"image": name, "question": "What color is the shape?", "answer": color, "answer_type": "OPEN"},
                {"image": name, "question": "What shape is in the image?", "answer": shape, "answer_type": "OPEN"},
                {"image": name, "question": f"Is there a {asked}?", "answer": "yes" if asked == shape else "no", "answer_type": "CLOSED"},
            ]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), {"train": 24, "val": 6, "test": 6})


def tiny_run_config(root: Path, output_dir: Path, **train_changes) -> VQARunConfig:
    config = VQARunConfig(model=tiny_model_config(), output_dir=str(output_dir), name="run")
    config.data.format = "jsonl"
    config.data.root = str(root)
    config.data.batch_size = 16
    config.train.epochs = 2
    config.train.progress = False
    config.train.precision = "fp32"
    config.train.log_every_steps = 1
    for key, value in train_changes.items():
        setattr(config.train, key, value)
    return config


# CI sets this: tests that need external data then fail instead of skipping without it.
REQUIRE_EXTERNAL_DATA = os.environ.get("DUALHEAD_REQUIRE_EXTERNAL_DATA", "") not in ("", "0")


@pytest.fixture(scope="session")
def vqa_rad_root() -> Path:
    if not (VQA_RAD_ROOT / "trainset.json").is_file():
        message = f"VQA-RAD not found at {VQA_RAD_ROOT}: set DUALHEAD_VQA_RAD to its folder"
        if REQUIRE_EXTERNAL_DATA:
            pytest.fail(message)
        pytest.skip(message)
    return VQA_RAD_ROOT
