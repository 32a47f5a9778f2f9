"""Runs that survive crashes and mistakes, and a command line that answers user errors in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from dualhead.cli import main
from dualhead.core.config import load_config, save_config
from dualhead.core.trainer import Trainer, TrainingDiverged
from tests.conftest import draw_shape, tiny_run_config


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def finished_run(shapes_root, tmp_path_factory):
    """A finished tiny run (2 epochs), shared read-only by the tests that only inspect it."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny_run_config(shapes_root, root, epochs=2)
    Trainer(config, root / "run").fit()
    return root / "run"


# -- kill -9 while a checkpoint is written ------------------------------------------------------------

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from dualhead.core import checkpoints
    from dualhead.core.config import load_config
    from dualhead.core.trainer import Trainer

    where, run_dir = sys.argv[1], Path(sys.argv[2])
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "staging":  # while the new checkpoint's files are being flushed
        original = checkpoints._fsync_tree
        def fsync_then_die(directory):
            calls["n"] += 1
            if calls["n"] == 3:
                die()
            original(directory)
        checkpoints._fsync_tree = fsync_then_die
    else:  # between moving the old checkpoint aside and moving the new one in
        original = checkpoints.fsync_dir
        rename = Path.rename
        def rename_then_die(self, target):
            result = rename(self, target)
            if str(target).endswith("last.old"):
                calls["n"] += 1
                if calls["n"] == 2:
                    die()
            return result
        Path.rename = rename_then_die
    Trainer(load_config(run_dir / "config.yaml"), run_dir).fit()
    """
)


@pytest.mark.parametrize("where", ["staging", "swap"])
def test_kill_9_during_a_checkpoint_write_then_resume_finishes_the_run(where, shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, epochs=2, checkpoint_every_steps=1)
    config.data.batch_size = 8
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(config, run_dir / "config.yaml")
    process = subprocess.run([sys.executable, "-c", KILLER, where, str(run_dir)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             capture_output=True, timeout=300)
    assert process.returncode == -9, process.stderr.decode()[-2000:]
    if where == "swap":
        assert not (run_dir / "last").exists() and (run_dir / "last.old").is_dir()  # killed mid-swap
    result = _run("train", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output
    state = torch.load(run_dir / "last" / "trainer_state.pt", weights_only=True)["progress"]
    assert state["epoch"] == 2 and (run_dir / "test_metrics.json").is_file()


# -- resume checks ------------------------------------------------------------------------------------


def _copy_run(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_resume_refuses_a_checkpoint_with_other_dimensions_naming_the_key(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path / "run")
    config = load_config(run / "config.yaml")
    config.model.hidden_dim = 64
    save_config(config, run / "config.yaml")
    result = _run("train", "--resume", str(run))
    assert result.exit_code == 1 and "model.hidden_dim: checkpoint 32, run 64" in result.output
    assert "Traceback" not in result.output


def test_resume_accepts_a_checkpoint_written_before_a_model_option_existed(finished_run, tmp_path):
    """A checkpoint without a key the model config has gained since (here the experts' options)
    resumes, the option at its default (off)."""
    run = _copy_run(finished_run, tmp_path / "run")
    for name in ("last", "best"):
        saved_file = run / name / "config.json"
        saved = json.loads(saved_file.read_text())
        assert saved["model"].pop("experts")["route"] == "none"  # what a checkpoint of before it held
        saved_file.write_text(json.dumps(saved))
    trainer = Trainer.resume(run)
    assert trainer.model.config.experts.route == "none"


def test_resume_refuses_a_reordered_answer_vocabulary_naming_the_answer(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path / "run")
    answers_file = run / "last" / "answers.json"
    answers = json.loads(answers_file.read_text())
    answers["open_answers"] = answers["open_answers"][::-1]
    answers_file.write_text(json.dumps(answers))
    result = _run("train", "--resume", str(run))
    assert result.exit_code == 1 and "answer vocabulary" in result.output and "position 0" in result.output


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, epochs=1)
    run = tmp_path / "run"
    run.mkdir()
    save_config(config, run / "config.yaml")  # what a run leaves when it dies in its first epoch
    result = _run("train", "--resume", str(run))
    assert result.exit_code == 0, result.output
    assert (run / "last" / "model.safetensors").is_file() and (run / "test_metrics.json").is_file()


def test_best_checkpoint_newer_than_last_keeps_its_score_after_resume(finished_run, tmp_path):
    """Killed between saving best/ and last/: last/ remembers an older, lower best score."""
    run = _copy_run(finished_run, tmp_path / "run")
    best_score = torch.load(run / "best" / "trainer_state.pt", weights_only=True)["progress"]["best"]
    state_file = run / "last" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["progress"]["best"] = -1.0
    torch.save(state, state_file)
    assert Trainer.resume(run).state["best"] == best_score


def test_a_selection_metric_that_is_never_produced_fails_at_start(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, metric="acuracy")
    with pytest.raises(ValueError, match="unknown train.metric 'acuracy'"):
        Trainer(config, tmp_path / "run")


# -- non-finite values ----------------------------------------------------------------------------------


def test_a_non_finite_gradient_stops_the_run_and_keeps_the_checkpoint_finite(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, epochs=2)
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    kept = (tmp_path / "run" / "last" / "model.safetensors").read_bytes()
    trainer = Trainer(config, tmp_path / "run")
    weight = trainer.model.fusion.image_proj.weight if hasattr(trainer.model.fusion, "image_proj") else next(trainer.model.fusion.parameters())
    weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(TrainingDiverged, match="non-finite gradient"):
        trainer.fit()
    assert (tmp_path / "run" / "last" / "model.safetensors").read_bytes() == kept
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())  # never stepped with it


# -- the command line -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "train.grad_accum=0"], "train.grad_accum must be >= 1"),
        (["train", "train.device=tpu"], "unknown device 'tpu'"),
        (["train", "train.precision=fp8"], "unknown train.precision"),
        (["ablate", "--seeds", "0"], "0 is not in the range x>=1"),
        (["data", "summary", "vqa_rad"], "needs its folder"),
    ],
)
def test_bad_options_are_one_line_errors_before_any_work(args, message):
    result = _run(*args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_os_errors_are_messages_and_debug_shows_the_traceback(shapes_root, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output directory should be")
    config = tiny_run_config(shapes_root, blocker, epochs=1)
    save_config(config, tmp_path / "config.yaml")
    result = _run("train", str(tmp_path / "config.yaml"))
    assert result.exit_code == 1 and "Not a directory" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["--debug", "train", str(tmp_path / "config.yaml")])
    assert isinstance(result.exception, OSError)


def test_corrupt_weights_and_state_files_are_messages(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path / "run")
    (run / "best" / "model.safetensors").write_bytes(b"not safetensors")
    result = _run("evaluate", str(run / "best"), "--format", "jsonl", "--root", str(tmp_path))
    assert result.exit_code == 1 and "Traceback" not in result.output
    (run / "last" / "trainer_state.pt").write_bytes(b"\x80\x04corrupt")
    result = _run("train", "--resume", str(run))
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_predict_input_reports_bad_lines_by_number_and_answers_the_rest(finished_run, tmp_path):
    draw_shape(tmp_path / "good.png", "circle", "red")
    lines = [
        {"image": "good.png", "question": "What color is the shape?"},
        {"image": "missing.png", "question": "What shape is it?"},
        {"image": "good.png", "question": 42},
        "not json",
        {"image": "good.png", "question": "Is there a circle?"},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    result = CliRunner().invoke(main, ["predict", str(finished_run), "--input", str(path)])
    assert result.exit_code == 1
    answered = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["line"] for row in answered] == [1, 5]
    for number in (2, 3, 4):
        assert f"questions.jsonl line {number}:" in result.stderr
    assert "missing.png" in result.stderr


def test_predict_top_k_must_be_positive(finished_run, tmp_path):
    draw_shape(tmp_path / "x.png", "square", "blue")
    result = _run("predict", str(finished_run), "--image", str(tmp_path / "x.png"), "--question", "q", "--top-k", "0")
    assert result.exit_code == 2 and "--top-k" in result.output


def test_a_checkpoint_whose_text_encoder_came_from_a_local_directory_loads_without_it(tmp_path):
    import shutil

    from PIL import Image
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    from dualhead.backbones.text import minilm_path
    from dualhead.vqa.data import AnswerVocab
    from dualhead.vqa.model import DualHeadVQA
    from tests.conftest import tiny_model_config

    local = tmp_path / "my-encoder"  # a user's own fine-tuned encoder, with its own tokenizer
    DistilBertModel(DistilBertConfig(n_layers=1, dim=32, n_heads=2, hidden_dim=64)).save_pretrained(local)
    AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True).save_pretrained(local)
    config = tiny_model_config()
    config.text.name, config.text.num_layers, config.text.hidden_size = str(local), None, None
    torch.manual_seed(0)
    model = DualHeadVQA(config, AnswerVocab(["red", "blue"])).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    shutil.rmtree(local)  # another machine: the source directory is not there
    loaded = DualHeadVQA.from_pretrained(tmp_path / "checkpoint")
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    before = model.answer([image], ["what color is it?"])[0]
    after = loaded.answer([image], ["what color is it?"])[0]
    assert before.answer == after.answer and before.probability == pytest.approx(after.probability, abs=1e-6)


def test_a_study_on_data_without_a_test_split_fails_before_training(shapes_root, tmp_path):
    import shutil

    root = tmp_path / "no_test"
    shutil.copytree(shapes_root, root)
    (root / "test.jsonl").unlink()
    config = tiny_run_config(root, tmp_path)
    save_config(config, tmp_path / "config.yaml")
    result = _run("ablate", str(tmp_path / "config.yaml"), "--seeds", "1")
    assert result.exit_code == 1 and "has no test split" in result.output
    assert not (tmp_path / "run").exists()


def test_worker_image_caches_share_one_budget(shapes_root):
    from dualhead.vqa.data import ImageStore
    from dualhead.vqa.data.images import ImagePreprocessor

    store = ImageStore(ImagePreprocessor(32, (0.5,) * 3, (0.5,) * 3), max_bytes=1000)
    worker_store = store.for_workers(4)
    assert worker_store is not store and worker_store.max_bytes == 250 and not worker_store.cached_bytes


def test_a_resumed_run_repeating_its_best_epoch_does_not_count_a_bad_epoch(shapes_root, tmp_path):
    """Killed after saving best/ but before last/: the resumed run repeats that epoch, scores the
    same, and must not move closer to early stopping than the uninterrupted run did."""
    config = tiny_run_config(shapes_root, tmp_path, epochs=3, early_stopping_patience=1)
    trainer = Trainer(config, tmp_path / "run")
    trainer.state.update(step=10, best=0.7)
    trainer.save("best")
    trainer.state.update(best=0.5, bad_epochs=0)  # what the older last/ remembers
    trainer._recover_best()
    assert trainer.state["best"] == 0.7
    trainer.experiment.evaluate = lambda split, final=False: {"accuracy": 0.7}
    trainer._validate(epoch=2)
    assert trainer.state["bad_epochs"] == 0 and not trainer.state["stopped"]
    trainer.state["step"] = 20  # a later epoch that only equals the best is a bad one
    trainer._validate(epoch=3)
    assert trainer.state["bad_epochs"] == 1 and trainer.state["stopped"]


def test_resume_refuses_a_checkpoint_without_a_model_configuration(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path / "run")
    (run / "last" / "config.json").write_text("{}")
    result = _run("train", "--resume", str(run))
    assert result.exit_code == 1 and "holds no model configuration" in result.output


def test_non_finite_weights_are_never_written_to_a_checkpoint(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, epochs=1)
    trainer = Trainer(config, tmp_path / "run")
    trainer.save("last")
    kept = (tmp_path / "run" / "last" / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(trainer.model.fusion.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="non-finite weights"):
        trainer.save("last")
    assert (tmp_path / "run" / "last" / "model.safetensors").read_bytes() == kept
