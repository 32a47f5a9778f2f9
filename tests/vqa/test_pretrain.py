"""`dualhead pretrain`: contrastive image-text pretraining whose encoders the VQA model then loads."""

from __future__ import annotations

import json
import random

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dualhead.cli import main
from dualhead.core.config import load_config, save_config
from dualhead.core.trainer import Trainer
from dualhead.vqa.config import PretrainConfig
from dualhead.vqa.data import load_splits
from dualhead.vqa.data.answers import AnswerVocab
from dualhead.vqa.model import DualHeadVQA
from dualhead.vqa.pretrain import ContrastiveEncoders, contrastive_loss, pair_batches, pretrain
from tests.conftest import tiny_run_config


def test_contrastive_loss_is_symmetric_infonce():
    similarities = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.0, 0.3], [0.0, 0.2, 3.0]])
    target = torch.arange(3)
    expected = (torch.nn.functional.cross_entropy(similarities, target)
                + torch.nn.functional.cross_entropy(similarities.T, target)) / 2
    torch.testing.assert_close(contrastive_loss(similarities), expected)
    assert contrastive_loss(100 * torch.eye(4)) < 1e-6


def test_pair_batches_hold_distinct_images_one_question_each(shapes_root):
    records = load_splits(tiny_run_config(shapes_root, "unused").data).train
    batches = pair_batches(records, 5, random.Random(0))
    images = [r.image for batch in batches for r in batch]
    assert len(images) == len(set(images)) == len({r.image for r in records})
    assert all(len({r.image for r in batch}) == len(batch) for batch in batches)


def test_pretraining_writes_encoders_the_vqa_model_loads(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path)
    summary = pretrain(config, tmp_path / "pre", PretrainConfig(epochs=2, batch_size=8), progress=False)
    assert [row["epoch"] for row in summary["history"]] == [0, 1]
    assert all(0.0 <= row["val_recall_at_1"] <= 1.0 for row in summary["history"])
    assert json.loads((tmp_path / "pre" / "pretrain.json").read_text())["best"] == summary["best"]
    overrides = summary["overrides"]
    assert any(o.startswith("model.text.num_layers=null") for o in overrides)  # the tiny text model's shape
    save_config(config, tmp_path / "config.yaml")
    model_config = load_config(tmp_path / "config.yaml", overrides).model
    model = DualHeadVQA(model_config, AnswerVocab(["red", "circle"]))
    saved = load_file(str(tmp_path / "pre" / "best" / "vision.safetensors"))
    for key, value in model.vision.timm_state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)


def test_cli_pretrain_prints_the_training_command(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path)
    (tmp_path / "tiny.yaml").write_text(json.dumps({"model": {"vision": {"name": "mobilenetv3_small_050", "weights": "none",
                                                                        "image_size": 32},
                                                             "text": {"name": "distilbert", "num_layers": 1, "hidden_size": 32}},
                                                   "data": {"format": "jsonl", "root": str(shapes_root)},
                                                   "train": {"progress": False, "precision": "fp32"}}))
    assert config.data.root == str(shapes_root)
    result = CliRunner().invoke(main, ["pretrain", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "pre"),
                                       "--epochs", "1", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "recall@1" in result.output and "model.vision.weights=" in result.output


def test_encoders_the_dual_head_model_freezes_still_pretrain(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path)
    config.model.vision.freeze = config.model.text.freeze = True
    before = ContrastiveEncoders(config, PretrainConfig()).vision.timm_state_dict()
    pretrain(config, tmp_path / "pre", PretrainConfig(epochs=1, batch_size=8), progress=False)
    after = load_file(str(tmp_path / "pre" / "best" / "vision.safetensors"))
    assert any(not torch.equal(before[key], after[key]) for key in before if before[key].is_floating_point())


def test_a_run_with_pretrain_epochs_pretrains_first_and_trains_from_the_best_encoders(shapes_root, tmp_path):
    """``pretrain.epochs`` makes pretraining the run's first step (into RUN/pretrain); the dual-head
    model starts from those encoders, and training draws the same random numbers as without it."""
    config = tiny_run_config(shapes_root, tmp_path, epochs=1)
    config.pretrain.epochs, config.pretrain.batch_size = 1, 8
    config.train.max_steps = 1
    trainer = Trainer(config, tmp_path / "run")
    trainer.experiment.prepare(tmp_path / "run")
    best = tmp_path / "run" / "pretrain" / "best"
    saved = load_file(str(best / "vision.safetensors"))
    for key, value in trainer.model.vision.timm_state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)
    text = load_file(str(best / "text" / "model.safetensors"))
    for key, value in trainer.model.text.model.state_dict().items():
        torch.testing.assert_close(value, text[key], msg=key)
    written = (best / "vision.safetensors").stat().st_mtime_ns
    trainer.experiment.prepare(tmp_path / "run")  # a resumed run reuses the finished pretraining
    assert (best / "vision.safetensors").stat().st_mtime_ns == written

    def first_batch_draw(pretrain_epochs: int, name: str) -> torch.Tensor:
        config.pretrain.epochs = pretrain_epochs
        run = Trainer(config, tmp_path / name)
        run.fit()
        return torch.rand(3)  # the random stream after one step of training

    torch.testing.assert_close(first_batch_draw(1, "with"), first_batch_draw(0, "without"))
