"""Encoders: output widths, gradients, freezing, weight resolution and its errors, pooling, offline weights."""

from __future__ import annotations

import socket

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import DistilBertConfig, DistilBertModel

from dualhead.backbones.config import TextConfig, VisionConfig
from dualhead.backbones.freeze import freeze_module
from dualhead.backbones.text import build_text_encoder
from dualhead.backbones.vision import build_vision_encoder, load_offline_efficientnet_lite0
from tests.backbones.conftest import assert_classifies_imagenet_photos

TINY_TEXT = TextConfig(name="distilbert", num_layers=2, hidden_size=64)
QUESTIONS = ["what color is the shape?", "is there a blue circle in the bottom left of the image?"]


def tiny_vision(**overrides) -> VisionConfig:
    return VisionConfig(**{"name": "mobilenetv3_small_050", "weights": "none", "image_size": 64, **overrides})


def pixels(encoder, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *encoder.data_config["input_size"])


@pytest.fixture(scope="module")
def tiny_text():
    torch.manual_seed(0)
    return build_text_encoder(TINY_TEXT)


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder(TextConfig()).eval()


# -- vision ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "image_size", "out_dim"),
    [
        ("efficientnet_lite0", 64, 1280),
        ("mobilenetv3_small_100", 64, 576),  # pooled before MobileNetV3's conv_head, as the reference design
        ("resnet18", 64, 512),
        ("vit_tiny_patch16_224", 32, 192),  # token path: timm's forward_head(pre_logits=True)
    ],
)
def test_vision_width_and_every_parameter_gets_a_gradient(name, image_size, out_dim):
    encoder = build_vision_encoder(VisionConfig(name=name, weights="none", image_size=image_size))
    assert encoder.out_dim == out_dim
    assert encoder.data_config["input_size"] == (3, image_size, image_size)
    features = encoder(pixels(encoder))
    assert features.shape == (2, out_dim)
    features.square().mean().backward()
    assert [n for n, p in encoder.named_parameters() if p.grad is None] == []


def test_mobilenet_drops_its_unused_conv_head():
    encoder = build_vision_encoder(tiny_vision(name="mobilenetv3_small_100"))
    full = timm.create_model("mobilenetv3_small_100", num_classes=0)
    assert isinstance(encoder.model.conv_head, nn.Identity)
    dropped = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in encoder.parameters())
    assert dropped == full.conv_head.weight.numel() + full.conv_head.bias.numel()


def test_data_config_follows_the_weights_and_image_size_overrides_size_only():
    default = build_vision_encoder(VisionConfig(weights="none"))
    # The offline Lite0 weights are a TensorFlow port: TF padding and preprocessing (mean = std = 0.5).
    assert default.arch == "tf_efficientnet_lite0"
    assert default.data_config["input_size"] == (3, 224, 224)
    assert default.data_config["mean"] == (0.5, 0.5, 0.5)
    small = build_vision_encoder(tiny_vision())
    assert small.data_config["input_size"] == (3, 64, 64)
    assert small.data_config["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert small.data_config["interpolation"] == "bicubic"


def test_frozen_vision_encoder_stays_fixed_under_training():
    encoder = build_vision_encoder(tiny_vision(freeze=True))
    assert encoder.frozen and not build_vision_encoder(tiny_vision()).frozen
    assert not any(p.requires_grad for p in encoder.parameters())
    parent = nn.Sequential(encoder, nn.Linear(encoder.out_dim, 2)).train()
    assert not any(m.training for m in encoder.modules())
    assert parent[1].training
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    optimizer = torch.optim.SGD(parent.parameters(), lr=1.0)
    parent(pixels(encoder, 4)).sum().backward()
    optimizer.step()
    assert all(p.grad is None for p in encoder.parameters())
    assert any("running_mean" in k for k in before)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and batch-norm statistics alike


def test_freeze_module_on_any_module_survives_train_and_returns_it():
    module = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    assert freeze_module(module) is module
    module.train()
    x = torch.ones(1, 3)
    assert torch.equal(module(x), module(x))  # dropout off


def test_local_weights_files_load_with_or_without_classifier(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("mobilenetv3_small_050")  # with classifier and conv_head
    state = source.state_dict()
    save_file(state, tmp_path / "full.safetensors")
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier.")}, tmp_path / "headless.pth")
    for file in ("full.safetensors", "headless.pth"):
        encoder = build_vision_encoder(tiny_vision(weights=str(tmp_path / file)))
        for key, value in encoder.model.state_dict().items():
            assert torch.equal(value, state[key]), (file, key)


def test_weights_file_with_missing_keys_names_them(tmp_path):
    state = timm.create_model("mobilenetv3_small_050", num_classes=0).state_dict()
    del state["conv_stem.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"broken\.safetensors.*missing keys \['conv_stem\.weight'\]"):
        build_vision_encoder(tiny_vision(weights=str(tmp_path / "broken.safetensors")))


def test_vision_errors_are_clear(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown timm model 'mobilenetv3_smal'.*mobilenetv3_small_100.*list_models"
    ):
        build_vision_encoder(tiny_vision(name="mobilenetv3_smal"))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match=rf"not found: {missing}.*'none'.*'hub'"):
        build_vision_encoder(tiny_vision(weights=str(missing)))
    with pytest.raises(
        ValueError, match=r"no offline weights exist for 'mobilenetv3_small_050'.*'none'.*'hub'"
    ):
        build_vision_encoder(tiny_vision(weights="offline"))


def test_hub_failure_says_network_is_needed(monkeypatch):
    create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("connection refused")
        return create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with pytest.raises(RuntimeError, match=r"connection refused.*network.*'offline'.*'none'"):
        build_vision_encoder(tiny_vision(weights="hub"))


@pytest.mark.slow
def test_offline_efficientnet_lite0_classifies_imagenet_photos():
    model = timm.create_model("tf_efficientnet_lite0")  # full classifier, TF conventions of the weights
    load_offline_efficientnet_lite0(model)
    photos = assert_classifies_imagenet_photos(model)
    # The encoder built by default holds the same weights: its features are the classifier's pre-logits.
    encoder = build_vision_encoder(VisionConfig()).eval()
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(photos), pre_logits=True)
        torch.testing.assert_close(encoder(photos), expected)


def test_offline_weights_refuse_a_model_with_other_conventions():
    with pytest.raises(ValueError, match=r"TensorFlow's conventions.*tf_efficientnet_lite0"):
        load_offline_efficientnet_lite0(timm.create_model("efficientnet_lite0"))


# -- text -----------------------------------------------------------------------------------------


def test_tiny_distilbert_shape_gradients_and_tokenizer(tiny_text):
    assert tiny_text.out_dim == 64 and tiny_text.model.config.n_layers == 2
    assert tiny_text.tokenizer.vocab_size == 30522  # MiniLM's bert-base-uncased WordPiece vocabulary
    tokens = tiny_text.tokenize(QUESTIONS)
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert (
        tokens["attention_mask"][0].sum() < tokens["attention_mask"][1].sum() == tokens["input_ids"].shape[1]
    )
    features = tiny_text(**tokens)
    assert features.shape == (2, 64)
    features.square().mean().backward()
    assert [n for n, p in tiny_text.named_parameters() if p.grad is None] == []
    tiny_text.zero_grad(set_to_none=True)


def test_tokenize_truncates_at_max_length():
    encoder = build_text_encoder(TextConfig(name="distilbert", num_layers=1, hidden_size=32, max_length=8))
    assert encoder.tokenize(["word " * 50])["input_ids"].shape == (1, 8)


def test_architecture_defaults_and_shrinking():
    bert = build_text_encoder(TextConfig(name="bert-base", num_layers=2, hidden_size=128))
    assert bert.out_dim == 128 and bert.model.config.num_attention_heads == 2
    assert bert.model.config.intermediate_size == 512 and bert.model.pooler is None
    distilbert = build_text_encoder(TextConfig(name="distilbert"))
    assert distilbert.out_dim == 768 and distilbert.model.config.n_layers == 6
    assert sum(p.numel() for p in distilbert.parameters()) == 66_362_880  # the reference design's count
    with pytest.raises(ValueError, match="multiple of 64"):
        build_text_encoder(TextConfig(name="distilbert", hidden_size=100))


def test_pooling_mean_ignores_padding_and_differs_from_cls(tiny_text):
    tiny_text.eval()
    with torch.no_grad():
        alone = tiny_text(**tiny_text.tokenize(QUESTIONS[:1]))
        padded = tiny_text(**tiny_text.tokenize(QUESTIONS))  # the first question is padded here
        tiny_text.pooling = "cls"
        cls = tiny_text(**tiny_text.tokenize(QUESTIONS[:1]))
    tiny_text.pooling = "mean"
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cls, alone, atol=1e-3)
    with pytest.raises(ValueError, match="'mean' or 'cls'"):
        build_text_encoder(TextConfig(name="distilbert", num_layers=1, hidden_size=32, pooling="max"))


def test_frozen_text_encoder_has_no_dropout_and_no_grads():
    encoder = build_text_encoder(TextConfig(name="distilbert", num_layers=1, hidden_size=32, freeze=True))
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    nn.Sequential(encoder).train()
    assert not any(m.training for m in encoder.modules())
    tokens = encoder.tokenize(QUESTIONS)
    torch.testing.assert_close(encoder(**tokens), encoder(**tokens), atol=0, rtol=0)


def test_text_weights_and_model_directories(tmp_path, tiny_text):
    torch.manual_seed(2)
    checkpoint = DistilBertModel(DistilBertConfig(n_layers=1, dim=32, n_heads=1, hidden_dim=64))
    checkpoint.save_pretrained(tmp_path / "distil")  # no tokenizer: MiniLM's is used
    loaded = build_text_encoder(TextConfig(name="distilbert", weights=str(tmp_path / "distil")))
    for key, value in checkpoint.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    # Any other name is a local Hugging Face directory: model and tokenizer read from it.
    tiny_text.model.save_pretrained(tmp_path / "hf")
    tiny_text.tokenizer.save_pretrained(tmp_path / "hf")
    from_dir = build_text_encoder(TextConfig(name=str(tmp_path / "hf"))).eval()
    tiny_text.eval()
    tokens = tiny_text.tokenize(QUESTIONS)
    with torch.no_grad():
        torch.testing.assert_close(from_dir(**tokens), tiny_text(**tokens))


def test_text_errors_are_clear(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown text encoder 'roberta'.*'minilm'.*'distilbert'.*directory"
    ):
        build_text_encoder(TextConfig(name="roberta"))
    with pytest.raises(ValueError, match=rf"weights directory not found: {tmp_path / 'nope'}"):
        build_text_encoder(TextConfig(name="distilbert", weights=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="'distilbert' and 'bert-base' only"):
        build_text_encoder(TextConfig(name="minilm", hidden_size=128))


@pytest.mark.slow
def test_minilm_loads_without_network_and_ranks_paraphrases(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    encoder = build_text_encoder(TextConfig()).eval()
    assert encoder.out_dim == 384
    questions = ["what color is the shape?", "which colour is the shape?", "is there a tumor in the lung?"]
    with torch.no_grad():
        a, b, c = encoder(**encoder.tokenize(questions))
    cosine = nn.functional.cosine_similarity
    assert cosine(a, b, dim=0) > cosine(a, c, dim=0) + 0.2


# -- precision and devices ------------------------------------------------------------------------


def _bf16_matches_fp32(encoder, inputs: dict, device: str) -> None:
    encoder = encoder.to(device).eval()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        reference = encoder(**inputs)
        with torch.autocast(device, dtype=torch.bfloat16):
            low = encoder(**inputs)
    assert low.shape == reference.shape and torch.isfinite(low).all()
    assert nn.functional.cosine_similarity(low.float(), reference, dim=1).min() > 0.98


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_encoders_under_bf16_autocast(device, tiny_text):
    torch.manual_seed(3)
    vision = build_vision_encoder(tiny_vision())
    _bf16_matches_fp32(vision, {"pixel_values": pixels(vision)}, device)
    _bf16_matches_fp32(tiny_text, dict(tiny_text.tokenize(QUESTIONS)), device)
    tiny_text.to("cpu")
