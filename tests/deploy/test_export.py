"""ONNX export: onnxruntime gives PyTorch's probabilities (fp32), whatever the batch and question length."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from dualhead.cli import main
from dualhead.deploy.export import ProbabilityPaths, export_onnx
from dualhead.vqa.config import EncoderAdaptersConfig, ExpertsConfig
from dualhead.vqa.data import AnswerVocab
from dualhead.vqa.model import DualHeadVQA
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module", params=["attention", "cross_attention", "experts", "cross_stitch_towers", "encoder_lora"])
def exported(tmp_path_factory, request):
    torch.manual_seed(0)
    if request.param == "experts":  # experts per question type: the gate reads the tokens, no type is input
        config = tiny_model_config(experts=ExpertsConfig(route="question_type"))
        model = DualHeadVQA(config, AnswerVocab(["red", "blue", "green"]), question_types=["COLOR", "PRES", "SIZE"])
    elif request.param == "cross_stitch_towers":  # a fusion per head, mixed by the cross-stitch unit
        model = DualHeadVQA(tiny_model_config(towers="cross_stitch"), AnswerVocab(["red", "blue", "green"]))
    elif request.param == "encoder_lora":  # each head runs the encoders with its own LoRA updates (hooks)
        config = tiny_model_config(encoder_adapters=EncoderAdaptersConfig(kind="lora"))
        model = DualHeadVQA(config, AnswerVocab(["red", "blue", "green"]))
        with torch.no_grad():  # off their zero start, so that the exported graph must carry them
            for param in model.encoder_adapters.parameters():
                param.add_(0.05 * torch.randn_like(param))
    else:
        model = DualHeadVQA(tiny_model_config(fusion=request.param), AnswerVocab(["red", "blue", "green"]))
    model.eval()
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(model, out, quantize=True)
    return model, out


def _run(path, pixels, tokens):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"pixel_values": pixels.numpy(), "input_ids": tokens["input_ids"].numpy(), "attention_mask": tokens["attention_mask"].numpy()}
    return session.run(None, feed)


def test_onnx_model_and_each_head_match_pytorch_for_other_batch_sizes_and_lengths(exported):
    model, out = exported
    questions = ["is the lesion on the left side of the image?", "what colour?", "is it red?"]
    tokens = AutoTokenizer.from_pretrained(out / "tokenizer")(questions, padding="longest", return_tensors="pt")
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = ProbabilityPaths(model, ("binary", "open", "router"))(pixels, tokens["input_ids"], tokens["attention_mask"])
    for got, want in zip(_run(out / "model.onnx", pixels, tokens), reference, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    (binary,) = _run(out / "binary_head.onnx", pixels, tokens)
    (open_,) = _run(out / "open_head.onnx", pixels, tokens)
    np.testing.assert_allclose(binary, reference[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(open_, reference[1].numpy(), rtol=1e-4, atol=1e-5)
    int8 = _run(out / "model.int8.onnx", pixels, tokens)
    assert [a.shape for a in int8] == [r.shape for r in reference]
    np.testing.assert_allclose(int8[1].sum(-1), 1.0, rtol=1e-4)


def test_vocabulary_and_preprocessing_travel_with_the_graphs(exported):
    model, out = exported
    assert json.loads((out / "answers.json").read_text())["open_answers"] == model.vocab.open_answers
    preprocessing = json.loads((out / "preprocessing.json").read_text())
    assert preprocessing["image_size"] == 32 and preprocessing["max_length"] == model.text.max_length
    assert preprocessing["outputs"]["model.onnx"] == ["binary", "open", "router"]


def test_export_command_writes_a_run_s_best_checkpoint(tmp_path, exported):
    model, _ = exported
    model.save_pretrained(tmp_path / "run" / "best")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--format", "onnx", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.onnx").is_file() and "model.onnx" in result.output
