"""`dualhead train`, resume, evaluate and predict, end to end on small data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dualhead.cli import main
from dualhead.core.config import save_config
from dualhead.core.trainer import Trainer, TrainingDiverged
from dualhead.vqa.experiment import make_loader
from dualhead.vqa.features import model_inputs
from tests.conftest import tiny_run_config

ARTEFACTS = [
    "config.yaml",
    "metrics.jsonl",
    "best/model.safetensors",
    "best/config.json",
    "best/answers.json",
    "last/model.safetensors",
    "last/trainer_state.pt",
    "loss.png",
    "accuracy.png",
    "confusion_binary_test.png",
    "gradient_conflict.png",
    "test_metrics.json",
    "results.md",
]


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_train_writes_every_artefact_and_evaluates(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, epochs=3, diagnostics_every_steps=2)
    trainer = Trainer(config, tmp_path / "run")
    results = trainer.fit()
    run = tmp_path / "run"
    for name in ARTEFACTS:
        assert (run / name).is_file(), f"missing {name}"
    assert any((run / "tensorboard").iterdir())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in epochs if row["kind"] == "epoch"]
    assert [row["epoch"] for row in epochs] == [1, 2, 3]  # epochs completed
    assert all("val/accuracy" in row and "train/loss/binary" in row and "train/loss/open" in row for row in epochs)
    diagnostics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    diagnostics = [row for row in diagnostics if row["kind"] == "diagnostics"]
    assert diagnostics and all(-1 <= row["cosine/binary~open"] <= 1 and row["grad_norm/open"] > 0 for row in diagnostics)
    test = results["test"]
    assert test["count"] == 18 and test["binary_count"] == 6 and test["open_count"] == 12
    for key in ("accuracy", "binary_accuracy", "open_accuracy", "oracle_accuracy", "router_accuracy", "type/CLOSED/accuracy"):
        assert 0.0 <= test[key] <= 1.0, key

    output = _cli("evaluate", str(run), "--json", str(tmp_path / "eval.json"))
    assert "binary_accuracy" in output and "router_accuracy" in output
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert evaluated["accuracy"] == pytest.approx(test["accuracy"], abs=1e-9)

    ensemble = json.loads(
        _cli("evaluate", str(run / "best"), "--checkpoints", str(run / "last"), "--json", str(tmp_path / "ens.json")) and (tmp_path / "ens.json").read_text()
    )
    assert len(ensemble["checkpoints"]) == 2 and 0.0 <= ensemble["metrics"]["accuracy"] <= 1.0

    image = shapes_root / "images" / "test_0.png"
    output = _cli("predict", str(run), "--image", str(image), "--question", "What color is the shape?")
    assert output.startswith("answer: ") and "head: " in output and output.count("\n") >= 3
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"image": str(image), "question": "Is there a circle?"}) + "\n" + json.dumps({"image": str(image), "question": "What shape is in the image?"}) + "\n")
    rows = [json.loads(line) for line in _cli("predict", str(run / "best"), "--input", str(queries)).splitlines()]
    assert len(rows) == 2 and all(row["head"] in ("binary", "open") and len(row["top"]) >= 2 for row in rows)


def test_same_seed_gives_the_same_model_twice(shapes_root, tmp_path):
    for name in ("a", "b"):
        config = tiny_run_config(shapes_root, tmp_path, epochs=1)
        Trainer(config, tmp_path / name).fit()
    a, b = _weights(tmp_path / "a" / "last"), _weights(tmp_path / "b" / "last")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("fusion", ["attention", "cross_attention"])
def test_frozen_encoder_feature_cache_gives_the_features_the_encoders_give(shapes_root, tmp_path, fusion):
    """What the cache must make equal is the model's input: fp32 features of the same images and
    questions (pooled vectors, or region tokens and word states), computed in other batch shapes.
    Training on either then differs only by rounding, which a CPU's kernels may amplify over an
    epoch (so weights after training are not compared)."""
    config = tiny_run_config(shapes_root, tmp_path, epochs=1)
    config.model.fusion = fusion
    config.model.vision.freeze = True
    config.model.text.freeze = True
    trainer = Trainer(config, tmp_path / "run")
    experiment = trainer.experiment
    experiment.on_epoch_start(0)
    assert experiment.cache is not None and experiment.cache.has_images and experiment.cache.has_text
    cached_batch = next(iter(experiment.train_loader()))
    assert cached_batch.pixel_values is None and cached_batch.input_ids is None  # nothing decoded twice
    uncached = make_loader(trainer.model, experiment.splits.train, experiment.train_sampler, experiment.store)
    experiment.train_sampler.set_epoch(0)
    batch = next(iter(uncached))
    cache, inputs = experiment.cache, model_inputs(batch, experiment.cache)
    with torch.no_grad():
        direct_images = trainer.model.encode_images(batch.pixel_values)
        direct_text = trainer.model.encode_questions(batch.input_ids, batch.attention_mask)
    # fp32 sums over ~10^3 terms in other orders: a relative error of a few 1e-6, bounded well below 1e-4
    torch.testing.assert_close(inputs["image_features"], direct_images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inputs["text_features"], direct_text, rtol=1e-4, atol=1e-5)
    assert len(cache.image_rows) == len({r.image for r in experiment.splits.train + experiment.splits.val + experiment.splits.test})
    trainer.fit()  # and a run on cached features trains and evaluates end to end
    assert (tmp_path / "run" / "test_metrics.json").is_file()


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, epochs=2)
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    kept = _weights(tmp_path / "run" / "last")
    trainer = Trainer(config, tmp_path / "run")
    with torch.no_grad():
        trainer.model.open_head[-1].bias.fill_(float("nan"))
    trainer.state["epoch"] = 0
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch 1"):
        trainer.fit()
    after = _weights(tmp_path / "run" / "last")
    assert all(torch.equal(kept[k], after[k]) for k in kept)


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_same_result(shapes_root, tmp_path):
    """Kill a real `dualhead train` process after a mid-epoch checkpoint; `--resume` must finish the
    run and end with the same weights as an uninterrupted run of the same seed."""
    config = tiny_run_config(shapes_root, tmp_path, epochs=2, checkpoint_every_steps=1)
    config.data.batch_size = 8  # about 10 batches per epoch
    config.name = "killed"
    config_path = tmp_path / "config.yaml"
    save_config(config, config_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dualhead.cli", "train", str(config_path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = tmp_path / "killed" / "last" / "trainer_state.pt"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if state_file.is_file():
                try:
                    progress = torch.load(state_file, weights_only=True)["progress"]
                except Exception:  # being written
                    progress = None
                if progress and progress["step"] >= 3:
                    break
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    progress = torch.load(state_file, weights_only=True)["progress"]
    assert progress["epoch"] == 0 and 3 <= progress["step"] < 9, progress

    _cli("train", "--resume", str(tmp_path / "killed"))
    config.name = "straight"
    Trainer(config, tmp_path / "straight").fit()
    resumed = torch.load(state_file, weights_only=True)["progress"]
    straight = torch.load(tmp_path / "straight" / "last" / "trainer_state.pt", weights_only=True)["progress"]
    assert resumed["epoch"] == straight["epoch"] == 2 and resumed["step"] == straight["step"]
    a, b = _weights(tmp_path / "killed" / "last"), _weights(tmp_path / "straight" / "last")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bad_override_and_missing_config_are_clear_errors(tmp_path):
    result = CliRunner().invoke(main, ["train", "train.epochz=3"])
    assert result.exit_code != 0 and "epochz" in result.output
    result = CliRunner().invoke(main, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code != 0 and "config file not found" in result.output


def test_frozen_warmup_trains_heads_on_cached_features_then_fine_tunes_everything(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, epochs=2, frozen_warmup_epochs=1)
    trainer = Trainer(config, tmp_path / "run")
    experiment = trainer.experiment
    seen = []  # (epoch, frozen stage, has cache, vision weights) at the start of each epoch
    enter_stage = experiment.on_epoch_start

    def recording(epoch):
        enter_stage(epoch)
        vision = {k: v.clone() for k, v in trainer.model.vision.state_dict().items()}
        seen.append((epoch, experiment.stage, experiment.cache is not None, vision))

    experiment.on_epoch_start = recording
    trainer.fit()
    starts = {}
    for epoch, *entry in seen:  # the first call of each epoch (evaluation calls it again)
        starts.setdefault(epoch, entry)
    assert starts[0][:2] == [(True, True, False), True] and starts[1][:2] == [(False, False, False), False]
    for key, value in starts[1][2].items():
        assert torch.equal(value, starts[0][2][key]), f"{key} changed during the frozen warm-up"
    last = _weights(tmp_path / "run" / "last")
    assert any(not torch.equal(last[f"vision.{k}"], v) for k, v in starts[1][2].items() if v.is_floating_point()), "vision did not train after warm-up"


def test_bf16_autocast_training_with_gradient_diagnostics(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, epochs=1, precision="bf16", diagnostics_every_steps=1)
    results = Trainer(config, tmp_path / "run").fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(row["kind"] == "diagnostics" for row in rows) >= 3
    assert 0.0 <= results["test"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_a_few_hundred_steps_on_easy_vqa_stop_resume_evaluate_predict(tmp_path):
    """The default dataset end to end: train (stopped by Ctrl-C half way), resume, evaluate, predict."""
    from dualhead.core.config import load_config
    from tests.conftest import tiny_model_config

    config = load_config("easy_vqa", ["train.max_steps=240", "train.checkpoint_every_steps=40", "train.progress=false",
                                      "train.frozen_warmup_epochs=0", f"output_dir={tmp_path}", "name=easy"])
    config.model = tiny_model_config()
    config.data.batch_size = 32
    trainer = Trainer(config, tmp_path / "easy")
    train_step = trainer.train_step

    def interrupted(*args, **kwargs):
        result = train_step(*args, **kwargs)
        if trainer.state["step"] == 120:
            raise KeyboardInterrupt
        return result

    trainer.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    # interrupted at step 120, before its checkpoint: the last one is from step 80
    assert torch.load(tmp_path / "easy" / "last" / "trainer_state.pt", weights_only=True)["progress"]["step"] == 80
    _cli("train", "--resume", str(tmp_path / "easy"))
    run = tmp_path / "easy"
    assert torch.load(run / "last" / "trainer_state.pt", weights_only=True)["progress"]["step"] == 240
    for name in ARTEFACTS:
        assert (run / name).is_file(), f"missing {name}"
    results = json.loads((run / "test_metrics.json").read_text())
    assert results["test"]["count"] == 9673 and results["test"]["accuracy"] > 0.5  # yes/no alone is 74%
    output = _cli("evaluate", str(run), "--split", "val")
    assert "| accuracy |" in output
    image = next(r.image for r in trainer.experiment.splits.test)
    output = _cli("predict", str(run), "--image", str(image), "--question", "What shape is in the image?")
    assert "head: open" in output or "head: binary" in output


def test_test_time_augmentation_averages_views_drawn_from_their_own_seeds(shapes_root, tmp_path, monkeypatch):
    from dualhead.vqa.data.images import ImagePreprocessor
    from dualhead.vqa.evaluate import evaluate_checkpoints

    Trainer(tiny_run_config(shapes_root, tmp_path, epochs=1), tmp_path / "run").fit()
    augment, augmented = ImagePreprocessor.augment, []

    def recording(self, batch, allow_flip):
        out = augment(self, batch, allow_flip)
        augmented.append(not torch.equal(out, batch))
        return out

    monkeypatch.setattr(ImagePreprocessor, "augment", recording)
    plain = evaluate_checkpoints([tmp_path / "run"], progress=False)
    assert plain["tta"] == 0 and not augmented
    torch.manual_seed(5)
    first = evaluate_checkpoints([tmp_path / "run"], progress=False, tta=2)
    assert augmented and any(augmented)
    torch.manual_seed(7)  # the views are drawn from their own seeds, not from the caller's RNG
    again = evaluate_checkpoints([tmp_path / "run"], progress=False, tta=2)
    assert first["tta"] == 2 and first["metrics"] == again["metrics"]
    assert 0.0 <= first["metrics"]["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="tta is a number of augmented views"):
        evaluate_checkpoints([tmp_path / "run"], progress=False, tta=-1)
    output = _cli("evaluate", str(tmp_path / "run"), "--tta", "1")
    assert "1 augmented views" in output and "accuracy" in output
