"""The Dual-Head VQA model: shapes, variants, freezing, persistence, routing."""

from __future__ import annotations

import pytest
import torch

from dualhead.vqa.data.answers import AnswerVocab
from dualhead.vqa.model import DualHeadVQA
from dualhead.vqa.params import parameter_rows
from tests.conftest import draw_shape, tiny_model_config

VOCAB = AnswerVocab(["red", "green", "blue", "circle", "square"])


def _inputs(model: DualHeadVQA, questions: list[str], n_images: int = 2):
    torch.manual_seed(0)
    size = model.preprocessor.image_size
    pixels = torch.randn(n_images, 3, size, size)
    tokens = model.text.tokenize(questions)
    image_index = torch.arange(len(questions)) % n_images
    return dict(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], image_index=image_index)


QUESTIONS = ["Is there a circle?", "What color is the shape?", "What shape is it?"]


@pytest.mark.parametrize("fusion", ["attention", "cross_attention", "concat", "product", "gated"])
@pytest.mark.parametrize("variant", ["reference", "deep_heads", "larger_fusion", "single_head", "no_router"])
def test_output_shapes(fusion: str, variant: str):
    changes = {"fusion": fusion}
    if variant == "deep_heads":
        changes["deep_heads"] = True
    elif variant == "larger_fusion":
        changes.update(hidden_dim=64, num_heads=8)
    elif variant == "single_head":
        changes["single_head"] = True
    elif variant == "no_router":
        changes["router"] = False
    model = DualHeadVQA(tiny_model_config(**changes), VOCAB).eval()
    out = model(**_inputs(model, QUESTIONS))
    batch, d = len(QUESTIONS), model.config.hidden_dim
    assert out.fused.shape == (batch, d)
    if variant == "single_head":
        assert out.binary_logits is None
        assert out.open_logits.shape == (batch, 2 + len(VOCAB.open_answers))
    else:
        assert out.binary_logits.shape == (batch, 2)
        assert out.open_logits.shape == (batch, len(VOCAB.open_answers))
    assert (out.router_logits is None) == (variant == "no_router")
    if fusion == "attention":
        assert out.attention.shape == (batch, 2, 2)
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(batch, 2))
    elif fusion == "cross_attention":
        rows, columns = model.vision.region_grid
        assert out.attention.shape == (batch, rows * columns)
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(batch))
    else:
        assert out.attention is None


def test_deep_heads_add_one_block_each():
    base = {r["component"]: r["parameters"] for r in parameter_rows(DualHeadVQA(tiny_model_config(hidden_dim=256), VOCAB))}
    deep = {r["component"]: r["parameters"] for r in parameter_rows(DualHeadVQA(tiny_model_config(hidden_dim=256, deep_heads=True), VOCAB))}
    assert deep["binary_head"] > base["binary_head"] and deep["open_head"] > base["open_head"]
    assert deep["fusion"] == base["fusion"]


@pytest.mark.parametrize("fusion", ["attention", "cross_attention"])
def test_grouped_inputs_match_per_question_inputs(fusion: str):
    model = DualHeadVQA(tiny_model_config(fusion=fusion), VOCAB).eval()
    grouped = _inputs(model, QUESTIONS, n_images=2)
    per_question = dict(grouped)
    per_question["pixel_values"] = grouped["pixel_values"][grouped["image_index"]]
    per_question["image_index"] = None
    with torch.no_grad():
        a, b = model(**grouped), model(**per_question)
    torch.testing.assert_close(a.open_logits, b.open_logits)
    torch.testing.assert_close(a.binary_logits, b.binary_logits)


@pytest.mark.parametrize("frozen", ["vision", "text", "both"])
def test_frozen_encoders_get_no_gradient_and_keep_weights(frozen: str):
    config = tiny_model_config()
    config.vision.freeze = frozen in ("vision", "both")
    config.text.freeze = frozen in ("text", "both")
    model = DualHeadVQA(config, VOCAB).train()
    frozen_modules = [m for m, f in ((model.vision, config.vision.freeze), (model.text, config.text.freeze)) if f]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen_modules]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(**_inputs(model, QUESTIONS))
    (out.open_logits.sum() + out.binary_logits.sum() + out.router_logits.sum()).backward()
    optimizer.step()
    for module, state in zip(frozen_modules, before, strict=True):
        assert not module.training, "a frozen encoder stays in eval mode (batch norm statistics frozen)"
        assert all(p.grad is None for p in module.parameters())
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, state[key], msg=f"{key} changed")
    assert all(p.grad is not None for p in model.fusion.parameters())


@pytest.mark.parametrize("fusion", ["attention", "cross_attention"])
def test_save_and_load_give_identical_logits(tmp_path, fusion: str):
    model = DualHeadVQA(tiny_model_config(fusion=fusion), VOCAB).eval()
    inputs = _inputs(model, QUESTIONS)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["answers.json", "config.json", "model.safetensors", "text_encoder"]
    loaded = DualHeadVQA.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    torch.testing.assert_close(a.open_logits, b.open_logits, rtol=0, atol=0)
    torch.testing.assert_close(a.binary_logits, b.binary_logits, rtol=0, atol=0)
    torch.testing.assert_close(a.router_logits, b.router_logits, rtol=0, atol=0)
    assert loaded.vocab.open_answers == VOCAB.open_answers


def test_from_pretrained_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "config.json").write_text("{}")
        DualHeadVQA.from_pretrained(tmp_path)


def test_answer_routes_yes_no_questions_to_the_binary_head(tmp_path):
    torch.manual_seed(0)
    model = DualHeadVQA(tiny_model_config(), VOCAB)
    yes_no = ["Is there a circle?", "Is there a square?", "Is the shape red?", "Is it blue?"]
    open_ended = ["What color is the shape?", "What shape is it?", "Which colour is shown?", "What is the shape?"]
    tokens = model.text.tokenize(yes_no + open_ended)
    target = torch.tensor([1] * len(yes_no) + [0] * len(open_ended))
    optimizer = torch.optim.Adam(list(model.text.parameters()) + list(model.router.parameters()), lr=3e-3)
    model.train()
    for _ in range(60):  # train the router alone: it sees only the question
        logits = model.router(model.encode_questions(tokens["input_ids"], tokens["attention_mask"]))
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    image = tmp_path / "shape.png"
    draw_shape(image, "circle", "red")
    answers = model.answer([image] * 4, ["Is there a circle?", "Is it blue?", "What color is the shape?", "What shape is it?"])
    assert [a.head for a in answers] == ["binary", "binary", "open", "open"]
    assert answers[0].answer in ("yes", "no") and answers[2].answer in VOCAB.open_answers
    assert all(0.0 <= a.probability <= 1.0 and len(a.top) <= 5 for a in answers)
    assert answers[2].top[0] == (answers[2].answer, answers[2].probability)


def test_unknown_fusion_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown fusion 'bilinear'"):
        DualHeadVQA(tiny_model_config(fusion="bilinear"), VOCAB)


def test_cross_attention_reads_regions_and_words_and_cached_features_give_the_same_logits():
    """Token features computed apart (as the frozen-feature cache does, in chunks of different
    question lengths) stack, and feeding them gives the logits of the raw inputs."""
    model = DualHeadVQA(tiny_model_config(fusion="cross_attention", fusion_layers=1), VOCAB).eval()
    inputs = _inputs(model, QUESTIONS)
    rows, columns = model.vision.region_grid
    with torch.no_grad():
        regions = model.encode_images(inputs["pixel_values"])
        chunks = [model.text.tokenize(QUESTIONS[:1]), model.text.tokenize(QUESTIONS[1:])]
        words = torch.cat([model.encode_questions(t["input_ids"], t["attention_mask"]) for t in chunks])
        direct = model(**inputs)
        cached = model(image_features=regions, text_features=words, image_index=inputs["image_index"])
    assert regions.shape == (2, rows * columns, model.vision.out_dim)
    assert words.shape == (len(QUESTIONS), model.config.text.max_length, model.text.out_dim)
    torch.testing.assert_close(direct.open_logits, cached.open_logits)
    torch.testing.assert_close(direct.router_logits, cached.router_logits)
    pooled = model.text(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(model.pooled_question(words), pooled, rtol=1e-5, atol=1e-5)


def test_cross_attention_refuses_another_image_size():
    model = DualHeadVQA(tiny_model_config(fusion="cross_attention"), VOCAB).eval()
    tokens = model.text.tokenize(QUESTIONS[:1])
    with pytest.raises(ValueError, match="image regions"):
        model(pixel_values=torch.randn(1, 3, 64, 64), **tokens)
