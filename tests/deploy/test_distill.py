"""`dualhead distill`: the KD loss, teacher probabilities (one run or an ensemble), checks, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dualhead.cli import main
from dualhead.core.config import load_config
from dualhead.core.experiment import inference
from dualhead.core.trainer import Trainer
from dualhead.deploy.distill import (
    DistillationExperiment,
    DistillConfig,
    DistillRunConfig,
    distillation_config,
    distillation_loss,
    mix,
    teacher_targets,
)
from dualhead.vqa.data import AnswerVocab, ImageStore, load_splits
from dualhead.vqa.experiment import VQAExperiment, collect_probabilities, eval_sampler, make_loader
from dualhead.vqa.features import model_inputs
from dualhead.vqa.model import DualHeadVQA
from tests.conftest import tiny_model_config, tiny_run_config


@pytest.fixture(scope="module")
def teachers(shapes_root, tmp_path_factory):
    """Two tiny teacher runs on the shapes data (seeds 0 and 1), 2 epochs each."""
    out = tmp_path_factory.mktemp("teachers")
    runs = []
    for seed in (0, 1):
        config = tiny_run_config(shapes_root, out, epochs=2, seed=seed)
        config.name = f"teacher{seed}"
        Trainer(config, out / config.name).fit()
        runs.append(out / config.name)
    return runs


def student_config(shapes_root, tmp_path, teachers, **distill) -> DistillRunConfig:
    """The tiny run config as a distillation run, with a narrower fusion than the teachers'."""
    base = tiny_run_config(shapes_root, tmp_path, epochs=2)
    base.model.hidden_dim = 16
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "application"}
    options = {"teachers": [str(t / "best") for t in teachers], **distill}
    return DistillRunConfig(**fields, distill=DistillConfig(**options))


def first_batch(experiment):
    experiment.on_epoch_start(0)
    return next(iter(experiment.train_loader()))


def test_kd_loss_equals_its_formula_on_a_hand_example():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    temperature, alpha, task = 2.0, 0.25, torch.tensor(0.3)

    def kl(p, z):  # KL(p || softmax(z / T)), by hand
        q = [math.exp(v / temperature) for v in z]
        q = [v / sum(q) for v in q]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    expected_kd = (kl([0.75, 0.25], [1.0, 0.0]) + kl([0.5, 0.5], [0.0, 2.0])) / 2
    kd = distillation_loss(logits, teacher, temperature)
    assert float(kd) == pytest.approx(expected_kd, rel=1e-6)
    assert float(mix(task, kd, alpha, temperature)) == pytest.approx(0.75 * 0.3 + 0.25 * 4 * expected_kd, rel=1e-6)
    assert mix(task, kd, 0.0, temperature) == task and mix(None, None, alpha, temperature) is None
    assert float(mix(None, kd, 1.0, temperature)) == pytest.approx(4 * expected_kd, rel=1e-6)


def test_each_head_mixes_its_loss_with_kl_to_the_teacher_on_its_own_questions(shapes_root, tmp_path, teachers):
    config = student_config(shapes_root, tmp_path, teachers[:1], temperature=3.0, alpha=0.4)
    torch.manual_seed(0)
    experiment = DistillationExperiment(config)
    plain = VQAExperiment(dataclasses.replace(config, application="vqa"), experiment.splits)
    plain.model = experiment.model  # the same student weights: only the loss differs
    batch = first_batch(experiment)
    experiment.model.eval()
    output = experiment.forward(batch)
    got = experiment.task_losses(output, batch)
    labels_only = plain.task_losses(output, batch)
    teacher = DualHeadVQA.from_pretrained(teachers[0] / "best").eval()
    with torch.no_grad():
        teacher_output = teacher(**model_inputs(batch))  # same 32 px inputs as the student's
    rows = {"binary": batch.is_binary, "open": ~batch.is_binary}
    for name, logits, teacher_logits in (("binary", output.binary_logits, teacher_output.binary_logits),
                                         ("open", output.open_logits, teacher_output.open_logits)):
        teacher_probs = (teacher_logits[rows[name]] / 3.0).softmax(-1)
        student_log = (logits[rows[name]] / 3.0).log_softmax(-1)
        kl = (teacher_probs * (teacher_probs.log() - student_log)).sum(-1).mean()
        torch.testing.assert_close(got[name], 0.6 * labels_only[name] + 0.4 * 9 * kl, rtol=1e-5, atol=1e-6)
    router = plain.auxiliary_loss(output, batch)
    teacher_router = (teacher_output.router_logits / 3.0).softmax(-1)
    kl = (teacher_router * (teacher_router.log() - (output.router_logits / 3.0).log_softmax(-1))).sum(-1).mean()
    expected = 0.6 * router + 0.4 * 9 * kl * config.train.router_weight
    torch.testing.assert_close(experiment.auxiliary_loss(output, batch), expected, rtol=1e-5, atol=1e-6)


def test_alpha_zero_trains_exactly_as_plain_training(shapes_root, tmp_path, teachers):
    Trainer(student_config(shapes_root, tmp_path, teachers[:1], alpha=0.0), tmp_path / "alpha0").fit()
    plain_config = tiny_run_config(shapes_root, tmp_path, epochs=2)
    plain_config.model.hidden_dim = 16
    Trainer(plain_config, tmp_path / "plain").fit()
    runs = {name: tmp_path / name for name in ("alpha0", "plain")}

    def step_losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k.startswith("loss/")} for row in rows if row["kind"] == "step"]

    assert step_losses(runs["plain"]) and step_losses(runs["alpha0"]) == step_losses(runs["plain"])
    distilled, reference = (load_file(str(run / "best" / "model.safetensors")) for run in runs.values())
    assert all(torch.equal(distilled[key], reference[key]) for key in reference)
    # ... while alpha > 0 changes the losses from the first step on
    Trainer(student_config(shapes_root, tmp_path, teachers[:1], alpha=0.5), tmp_path / "alpha05").fit()
    assert step_losses(tmp_path / "alpha05")[0] != step_losses(runs["plain"])[0]


def test_teacher_probabilities_follow_each_question_and_an_ensemble_averages(shapes_root, teachers):
    records = load_splits(tiny_run_config(shapes_root, "unused").data).train
    checkpoints = [t / "best" for t in teachers]
    cpu = torch.device("cpu")
    one, two = (teacher_targets([c], records, 1.0, cpu) for c in checkpoints)
    ensemble = teacher_targets(checkpoints, records, 1.0, cpu)
    # each question's row holds the teacher's own probabilities for it (at T=1: its evaluation output)
    model = DualHeadVQA.from_pretrained(checkpoints[0])
    loader = make_loader(model, records, eval_sampler(records), ImageStore(model.preprocessor))
    prediction = collect_probabilities(inference(model, loader, lambda b: (b, model(**model_inputs(b)))))
    rows = torch.tensor([one.rows[(r.image, r.question)] for r in prediction.records])
    for head in ("binary", "open", "router"):
        torch.testing.assert_close(getattr(one.probs, head)[rows], getattr(prediction.probs, head))
        torch.testing.assert_close(getattr(ensemble.probs, head), (getattr(one.probs, head) + getattr(two.probs, head)) / 2)
    assert not torch.allclose(one.probs.open, two.probs.open)  # two different teachers
    assert len(one.rows) == len({(r.image, r.question) for r in records})
    hot = teacher_targets(checkpoints[:1], records, 4.0, cpu)  # a higher temperature flattens them
    assert (hot.probs.open.amax(-1) <= one.probs.open.amax(-1) + 1e-6).all()


def test_bad_teachers_and_options_are_clear_errors(shapes_root, tmp_path, teachers):
    other = tmp_path / "other"
    DualHeadVQA(tiny_model_config(), AnswerVocab(["red", "green", "blue", "square", "triangle"])).save_pretrained(other)
    with pytest.raises(ValueError, match=r"vocabulary differs from the teacher's .*answers.json\): at position \d+ "
                                         r"the teacher has '\w+', the student's data gives '\w+' \(5 vs 5 open answers\)"):
        DistillationExperiment(dataclasses.replace(student_config(shapes_root, tmp_path, []), distill=DistillConfig([str(other)])))
    single = student_config(shapes_root, tmp_path, teachers[:1])
    single.model.single_head = True
    with pytest.raises(ValueError, match="dual-head model and the student a single-head one"):
        DistillationExperiment(single)
    for options, message in (({"teachers": []}, "distill.teachers is empty"),
                             ({"temperature": 0.0}, "distill.temperature must be > 0, got 0.0"),
                             ({"alpha": 1.5}, r"distill.alpha must be in \[0, 1\], got 1.5")):
        config = student_config(shapes_root, tmp_path, teachers[:1])
        config.distill = dataclasses.replace(config.distill, **options)
        with pytest.raises(ValueError, match=message):
            DistillationExperiment(config)
    with pytest.raises(FileNotFoundError, match="neither a saved model"):
        distillation_config([tmp_path])


def test_cli_distils_an_ensemble_into_a_run_that_evaluates_and_resumes(teachers, tmp_path):
    runner = CliRunner()
    args = ["distill", str(teachers[0]), "--teacher", str(teachers[1]), f"output_dir={tmp_path}", "name=student",
            "model.hidden_dim=16", "model.vision.image_size=24", "distill.temperature=3", "train.epochs=1"]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / "student"
    config = load_config(run / "config.yaml")
    assert config.application == "vqa_distill" and config.distill.temperature == 3.0
    assert config.distill.teachers == [str((t / "best").resolve()) for t in teachers]
    assert config.model.vision.image_size == 24  # the teacher's own config, shrunk by the overrides
    assert DualHeadVQA.from_pretrained(run / "best").preprocessor.image_size == 24
    results = json.loads((run / "test_metrics.json").read_text())
    evaluated = runner.invoke(main, ["evaluate", str(run), "--json", str(tmp_path / "eval.json")], catch_exceptions=False)
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["accuracy"] == pytest.approx(results["test"]["accuracy"], abs=1e-9)
    assert isinstance(Trainer.resume(run).experiment, DistillationExperiment)  # `train --resume` keeps distilling
    again = runner.invoke(main, args)
    assert again.exit_code != 0 and "already exists" in again.output


def test_loading_the_teachers_leaves_the_student_s_random_stream_alone(shapes_root, tmp_path, teachers):
    states = []
    for experiment_class, config in ((DistillationExperiment, student_config(shapes_root, tmp_path, teachers)),
                                     (VQAExperiment, student_config(shapes_root, tmp_path, teachers))):
        torch.manual_seed(0)
        experiment = experiment_class(config)
        experiment.on_epoch_start(0)  # the distillation run computes its teachers' probabilities here
        states.append(torch.get_rng_state())
    assert torch.equal(*states)


def test_a_teacher_with_another_validation_split_is_warned_about(shapes_root, tmp_path, teachers, caplog):
    with caplog.at_level("WARNING", logger="dualhead.deploy.distill"):
        DistillationExperiment(student_config(shapes_root, tmp_path, teachers))  # seeds 0 and 1; the student's is 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "train.seed" in warnings[0] and str(teachers[1] / "best") in warnings[0]
