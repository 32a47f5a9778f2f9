"""Experts per question type: question types in every format, the gate, its auxiliary losses, training,
saving and loading, and the errors a wrong configuration gets."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dualhead.cli import main
from dualhead.core.config import load_config, with_overrides
from dualhead.core.trainer import Trainer
from dualhead.deploy.distill import DistillConfig, DistillRunConfig
from dualhead.vqa.config import ExpertsConfig, VQARunConfig
from dualhead.vqa.data import DataError, easy_vqa, jsonl, slake, vqa_rad
from dualhead.vqa.data.answers import AnswerVocab
from dualhead.vqa.data.batching import IGNORE, VQACollator
from dualhead.vqa.data.question_types import normalize_question_type, question_type_vocabulary
from dualhead.vqa.experiment import VQAExperiment
from dualhead.vqa.experts import importance_loss, type_loss
from dualhead.vqa.metrics import HeadProbabilities, score
from dualhead.vqa.model import QUESTION_TYPES_FILE, DualHeadVQA
from dualhead.vqa.studies import COMPARISON
from tests.conftest import tiny_model_config, tiny_run_config, write_shapes_dataset
from tests.vqa.test_datasets import write_easy_vqa, write_jsonl, write_slake, write_vqa_rad

TYPES = ["COLOR", "PRES", "SHAPE"]
VOCAB = AnswerVocab(["red", "green", "blue", "circle", "square"])


def _type_of(question: str) -> str:
    return (
        "COLOR"
        if question.startswith("What color")
        else "SHAPE"
        if question.startswith("What shape")
        else "PRES"
    )


@pytest.fixture(scope="module")
def typed_root(tmp_path_factory) -> Path:
    """The shapes dataset with a question_type on every question (mixed case, one combination)."""
    root = write_shapes_dataset(tmp_path_factory.mktemp("typed"), {"train": 16, "val": 4, "test": 4})
    for path in root.glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row["question_type"] = {"COLOR": "color", "SHAPE": "Shape", "PRES": "PRES, SHAPE"}[
                _type_of(row["question"])
            ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def experts_config(route: str = "question_type", count: int = 0, **changes) -> VQARunConfig:
    config = VQARunConfig(model=tiny_model_config(experts=ExpertsConfig(route=route, count=count)))
    for key, value in changes.items():
        setattr(config.model.experts, key, value)
    return config


# --- data -----------------------------------------------------------------------------------------


def test_normalize_question_type():
    assert normalize_question_type(" Other ") == "OTHER"
    assert normalize_question_type("PRES, POS") == "PRES"  # a combination: its first listed type
    assert normalize_question_type("ATRIB", {"ATRIB": "ATTRIB"}) == "ATTRIB"
    assert normalize_question_type("  ") is None and normalize_question_type(None) is None
    with pytest.raises(ValueError, match="not text"):
        normalize_question_type(3)


def test_vqa_rad_records_carry_their_normalised_type(tmp_path):
    write_vqa_rad(tmp_path)
    rows = json.loads((tmp_path / "trainset.json").read_text())
    for row, value in zip(rows, ["PRES, POS", "Other", "ATRIB", "PRSE", "ABN"], strict=False):
        row["question_type"] = value
    del rows[5]["question_type"]
    (tmp_path / "trainset.json").write_text(json.dumps(rows))
    splits = vqa_rad.load(tmp_path, val_fraction=0.0)
    assert [r.question_type for r in splits.train[:6]] == ["PRES", "OTHER", "ATTRIB", "PRES", "ABN", None]
    assert {r.question_type for r in splits.test} == {"PRES"}
    rows[0]["question_type"] = ["PRES"]
    (tmp_path / "trainset.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"invalid question type in trainset.json record 0 \(qid 0\)"):
        vqa_rad.load(tmp_path)


def test_slake_jsonl_csv_carry_types_and_easy_vqa_has_none(tmp_path):
    assert {r.question_type for r in slake.load(write_slake(tmp_path / "slake")).train} == {"ORGAN"}
    root = write_jsonl(tmp_path / "jsonl")
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines() if line]
    rows[0]["question_type"] = "modality"
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "test.csv").write_text(
        "image,question,answer,question_type\npics/0.png,Is it red?,No,color\npics/1.png,What?,a dog,\n"
    )
    splits = jsonl.load(root, val_fraction=0.0)
    assert Counter(r.question_type for r in splits.train) == {None: 9, "MODALITY": 1}
    assert [r.question_type for r in splits.test] == ["COLOR", None]
    assert {r.question_type for r in easy_vqa.load(write_easy_vqa(tmp_path / "easy")).train} == {None}


def test_real_vqa_rad_types(vqa_rad_root):
    splits = vqa_rad.load(vqa_rad_root)
    records = splits.train + splits.val + splits.test
    assert all(r.question_type is not None for r in records)
    assert question_type_vocabulary(splits.train) == sorted(
        ["ABN", "ATTRIB", "COLOR", "COUNT", "MODALITY", "ORGAN", "OTHER", "PLANE", "POS", "PRES", "SIZE"]
    )


def test_collator_indexes_types_and_ignores_unknown_ones(typed_root):
    records = jsonl.load(typed_root).train[:6]
    records[0] = type(records[0])(**{**records[0].__dict__, "question_type": "UNSEEN"})
    batch = VQACollator(VOCAB, load_images=False, load_text=False, question_types=TYPES)(records)
    assert batch.type_target.tolist() == [IGNORE] + [TYPES.index(r.question_type) for r in records[1:]]
    assert VQACollator(VOCAB, load_images=False, load_text=False)(records).type_target is None


# --- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "count", "experts"), [("question_type", 0, 3), ("learned", 4, 4)])
def test_gates_have_one_column_per_expert_and_sum_to_one(route, count, experts):
    torch.manual_seed(0)
    model = DualHeadVQA(
        tiny_model_config(experts=ExpertsConfig(route=route, count=count)), VOCAB, question_types=TYPES
    ).eval()
    tokens = model.text.tokenize(["is it red?", "what shape?", "what color is it?"])
    output = model(pixel_values=torch.randn(2, 3, 32, 32), image_index=torch.tensor([0, 1, 1]), **tokens)
    assert output.gate_logits.shape == (3, experts)
    probs = HeadProbabilities.from_output(output)
    torch.testing.assert_close(probs.experts.sum(-1), torch.ones(3))
    assert model.experts in model.shared_modules()  # both tasks' losses flow through the experts
    assert {id(p) for p in model.experts.parameters()} <= {id(p) for p in model.shared_parameters()}


def test_experts_off_by_default_change_nothing():
    torch.manual_seed(0)
    model = DualHeadVQA(tiny_model_config(), VOCAB)
    assert model.experts is None
    assert not any(name.startswith("experts") for name in model.state_dict())


def test_gradients_reach_every_expert_and_the_gate(typed_root):
    torch.manual_seed(0)
    config = experts_config()
    config.data.format, config.data.root = "jsonl", str(typed_root)
    experiment = VQAExperiment(config)
    model = experiment.model.train()
    batch = VQACollator(
        model.vocab, experiment.store, model.text.tokenize, question_types=model.question_types
    )(experiment.splits.train[:12])
    output = experiment.forward(batch)
    losses = experiment.task_losses(output, batch)
    (sum(losses.values()) + experiment.auxiliary_loss(output, batch)).backward()
    for name, param in model.experts.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_type_loss_teaches_the_type_classifier(typed_root):
    torch.manual_seed(0)
    config = experts_config()
    config.data.format, config.data.root = "jsonl", str(typed_root)
    experiment = VQAExperiment(config)
    model = experiment.model
    assert model.question_types == TYPES
    batch = VQACollator(model.vocab, experiment.store, model.text.tokenize, question_types=TYPES)(
        experiment.splits.train
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def error_and_loss() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            gate_logits = experiment.forward(batch).gate_logits
        model.train()
        error = float((gate_logits.argmax(-1) != batch.type_target).float().mean())
        return error, float(type_loss(gate_logits, batch.type_target))

    error_before, loss_before = error_and_loss()
    for _ in range(30):
        optimizer.zero_grad()
        experiment.experts_loss(experiment.forward(batch), batch).backward()
        optimizer.step()
    error_after, loss_after = error_and_loss()
    assert loss_after < 0.5 * loss_before
    assert error_after == 0.0 < error_before


def test_type_loss_is_a_batch_mean_that_skips_untyped_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    target = torch.tensor([0, 1, IGNORE])
    expected = torch.nn.functional.cross_entropy(logits[:2], target[:2], reduction="sum") / 3
    torch.testing.assert_close(type_loss(logits, target), expected)


def test_importance_loss_is_zero_for_balanced_gates_and_grows_with_collapse():
    assert float(importance_loss(torch.zeros(8, 4))) == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.tensor([[10.0, 0.0, 0.0, 0.0]] * 8)
    assert float(importance_loss(collapsed)) > 2.5  # CV^2 of (8, 0, 0, 0) is 3


def test_save_and_load_give_identical_outputs_and_keep_the_types(tmp_path):
    torch.manual_seed(0)
    model = DualHeadVQA(
        tiny_model_config(experts=ExpertsConfig(route="question_type")), VOCAB, question_types=TYPES
    ).eval()
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / QUESTION_TYPES_FILE).read_text())["question_types"] == TYPES
    loaded = DualHeadVQA.from_pretrained(tmp_path / "saved").eval()
    assert loaded.question_types == TYPES
    tokens = model.text.tokenize(["is there a circle?", "what color is the shape?"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(pixel_values=pixels, **tokens), loaded(pixel_values=pixels, **tokens)
    for name in ("binary_logits", "open_logits", "router_logits", "gate_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    (tmp_path / "saved" / QUESTION_TYPES_FILE).unlink()
    with pytest.raises(ValueError, match="needs the training split's question types"):
        DualHeadVQA.from_pretrained(tmp_path / "saved")


def test_text_features_from_a_cache_route_like_tokens():
    torch.manual_seed(0)
    model = DualHeadVQA(tiny_model_config(experts=ExpertsConfig(route="learned", count=2)), VOCAB).eval()
    tokens = model.text.tokenize(["is it red?", "what shape?"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        direct = model(pixel_values=pixels, **tokens)
        cached = model(pixel_values=pixels, text_features=model.encode_questions(**tokens))
    torch.testing.assert_close(direct.gate_logits, cached.gate_logits)


def test_question_type_accuracy_is_scored_over_typed_records(typed_root):
    records = jsonl.load(typed_root).test[:3]
    gates = torch.tensor([[0.0, 1.0, 0.0]] * 3)  # always PRES
    probs = HeadProbabilities(torch.full((3, 2), 0.5), torch.full((3, 5), 0.2), None, gates)
    metrics, _ = score(probs, records, VOCAB, TYPES)
    expected = sum(r.question_type == "PRES" for r in records) / 3
    assert (
        metrics["question_type_accuracy"] == pytest.approx(expected) and metrics["question_type_count"] == 3
    )
    assert "question_type_accuracy" not in score(probs, records, VOCAB)[0]
    mixed = HeadProbabilities.average([probs, HeadProbabilities(probs.binary, probs.open, None)])
    assert mixed.experts is None  # an ensemble member without experts: no gate to report


# --- configuration errors ---------------------------------------------------------------------------


def test_question_type_route_on_data_without_types_names_the_format_and_the_option(shapes_root):
    config = experts_config()
    config.data.format, config.data.root = "jsonl", str(shapes_root)
    with pytest.raises(
        ValueError, match=r"model.experts.route=question_type .* no question of the jsonl training split"
    ):
        VQAExperiment(config)


@pytest.mark.parametrize(
    ("experts", "message"),
    [
        (ExpertsConfig(route="gated"), "unknown model.experts.route 'gated'"),
        (ExpertsConfig(route="learned", count=1), "needs model.experts.count >= 2"),
        (ExpertsConfig(count=3), "model.experts.count=3 needs a route"),
        (ExpertsConfig(route="question_type", count=5), "model.experts.count=5 but the training split has 3"),
    ],
)
def test_bad_experts_config_is_a_clear_error(experts, message):
    with pytest.raises(ValueError, match=message):
        DualHeadVQA(tiny_model_config(experts=experts), VOCAB, question_types=TYPES)


# --- training end to end --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "count", "balancer"), [("question_type", 0, "pcgrad"), ("learned", 3, "uw")]
)
def test_training_with_experts_evaluates_saves_and_predicts(typed_root, tmp_path, route, count, balancer):
    config = tiny_run_config(typed_root, tmp_path, epochs=1, balancer=balancer)
    config.model.experts = ExpertsConfig(route=route, count=count)
    run = tmp_path / "run"
    results = Trainer(config, run).fit()
    steps = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss/aux"' in line
    ]
    assert steps and all(step["loss/aux"] > 0 for step in steps)
    test = json.loads((run / "test_metrics.json").read_text())["test"]
    assert ("question_type_accuracy" in test) == (route == "question_type")
    assert ("question_type_accuracy" in results["test"]) == (route == "question_type")
    model = DualHeadVQA.from_pretrained(run / "best")
    image = typed_root / "images" / "test_0.png"
    (answer,) = model.answer([image], ["What color is the shape?"])
    assert answer.expert in range(model.experts.num_experts)
    assert (answer.question_type in TYPES) if route == "question_type" else answer.question_type is None
    shown = CliRunner().invoke(
        main, ["predict", str(run), "--image", str(image), "--question", "What color is the shape?"]
    )
    assert shown.exit_code == 0 and f"expert {answer.expert}" in shown.output, shown.output
    # a resumed run rebuilds the same model: the checkpoint fits it
    VQAExperiment(config).check_checkpoint(run / "last")


def test_distillation_between_models_with_experts(typed_root, tmp_path):
    """A teacher routed by question type distils into a student whose experts learn their own gate."""
    teacher = tiny_run_config(typed_root, tmp_path, epochs=1)
    teacher.model.experts = ExpertsConfig(route="question_type")
    Trainer(teacher, tmp_path / "teacher").fit()
    base = tiny_run_config(typed_root, tmp_path, epochs=1)
    base.model.experts = ExpertsConfig(route="learned", count=2)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "application"}
    student = DistillRunConfig(
        **fields, distill=DistillConfig(teachers=[str(tmp_path / "teacher" / "best")], alpha=0.5)
    )
    Trainer(student, tmp_path / "student").fit()
    assert DualHeadVQA.from_pretrained(tmp_path / "student" / "best").experts.num_experts == 2


def test_comparison_rows_turn_experts_on():
    base = load_config("vqa_rad")
    rows = {variant.name: variant for variant in COMPARISON}
    assert (
        with_overrides(base, list(rows["experts_by_type"].overrides)).model.experts.route == "question_type"
    )
    learned = with_overrides(base, list(rows["experts_learned"].overrides)).model.experts
    assert (learned.route, learned.count) == ("learned", 4)
    assert base.model.experts.route == "none"  # off unless asked for
