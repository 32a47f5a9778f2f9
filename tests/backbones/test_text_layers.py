"""`model.text.num_layers` on a loaded encoder keeps its first layers, and save/load round-trips."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

from dualhead.backbones.config import TextConfig
from dualhead.backbones.text import build_text_encoder, minilm_path
from dualhead.vqa.data import AnswerVocab
from dualhead.vqa.model import DualHeadVQA
from tests.conftest import tiny_model_config

QUESTIONS = ["is there a fracture in the left femur?", "what organ is shown?"]


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1)


def check_first_layers(text: TextConfig, full_model, layers: int, tmp_path) -> None:
    """The truncated encoder gives the full model's hidden state after `layers` layers, and a Dual-Head
    model around it saves and loads to the same outputs."""
    encoder = build_text_encoder(text).eval()
    assert encoder.model.config.num_hidden_layers == layers
    tokens = encoder.tokenize(QUESTIONS)
    with torch.no_grad():
        hidden = full_model.eval()(**tokens, output_hidden_states=True).hidden_states[layers]
        torch.testing.assert_close(encoder(**tokens), mean_pooled(hidden, tokens["attention_mask"]), rtol=1e-5, atol=1e-5)
    model = DualHeadVQA(tiny_model_config(text=text), AnswerVocab(["lung", "liver"])).eval()
    model.save_pretrained(tmp_path / "saved")
    loaded = DualHeadVQA.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.text.num_layers == layers
    assert loaded.text.model.config.num_hidden_layers == layers
    assert loaded.state_dict().keys() == model.state_dict().keys()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels, **tokens).open_logits, model(pixels, **tokens).open_logits)


def test_a_local_bert_directory_keeps_its_first_layers_and_round_trips(tmp_path):
    torch.manual_seed(0)
    full = BertModel(BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64))
    full.save_pretrained(tmp_path / "bert")
    build_text_encoder(TextConfig()).tokenizer.save_pretrained(tmp_path / "bert")
    check_first_layers(TextConfig(name=str(tmp_path / "bert"), num_layers=2), full, 2, tmp_path)


def test_a_distilbert_checkpoint_keeps_its_first_layers(tmp_path):
    torch.manual_seed(1)
    full = DistilBertModel(DistilBertConfig(n_layers=3, dim=32, n_heads=1, hidden_dim=64))
    full.save_pretrained(tmp_path / "distil")
    check_first_layers(TextConfig(name="distilbert", weights=str(tmp_path / "distil"), num_layers=1), full, 1, tmp_path)


@pytest.mark.slow
def test_minilm_truncated_to_three_layers_is_its_lower_half_and_round_trips(tmp_path):
    full = BertModel.from_pretrained(minilm_path(), local_files_only=True)
    check_first_layers(TextConfig(name="minilm", num_layers=3), full, 3, tmp_path)


def test_layer_counts_outside_the_model_are_clear_errors(tmp_path):
    torch.manual_seed(2)
    DistilBertModel(DistilBertConfig(n_layers=2, dim=32, n_heads=1, hidden_dim=64)).save_pretrained(tmp_path / "distil")
    for layers in (0, 3):
        with pytest.raises(ValueError, match=rf"num_layers must be between 1 and 2 for .*distil, got {layers}"):
            build_text_encoder(TextConfig(name="distilbert", weights=str(tmp_path / "distil"), num_layers=layers))
    with pytest.raises(ValueError, match="hidden_size shapes a random init; a checkpoint has its own width"):
        build_text_encoder(TextConfig(name="distilbert", weights=str(tmp_path / "distil"), hidden_size=64))
