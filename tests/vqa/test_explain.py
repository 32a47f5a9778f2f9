"""`dualhead explain`: what an answer looked at, as a map over the image regions that sums to one."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dualhead.cli import main
from dualhead.vqa.data.answers import AnswerVocab
from dualhead.vqa.explain import ATTENTION, GRAD_CAM, explain, save_explanation
from dualhead.vqa.model import DualHeadVQA
from tests.conftest import draw_shape, tiny_model_config

VOCAB = AnswerVocab(["red", "green", "blue", "circle", "square"])


@pytest.mark.parametrize(("fusion", "method"), [("cross_attention", ATTENTION), ("attention", GRAD_CAM), ("gated", GRAD_CAM)])
@pytest.mark.parametrize("question", ["Is there a circle?", "What color is the shape?"])
def test_the_map_covers_the_regions_and_sums_to_one(tmp_path, fusion: str, method: str, question: str):
    torch.manual_seed(0)
    config = tiny_model_config(fusion=fusion)
    config.vision.image_size = 96  # a 3x3 grid of regions
    model = DualHeadVQA(config, VOCAB)
    image = tmp_path / "shape.png"
    draw_shape(image, "circle", "red", size=96)
    explanation = explain(model, image, question)
    assert explanation.method == method
    assert explanation.weights.shape == model.vision.region_grid == (3, 3)
    assert (explanation.weights >= 0).all()
    torch.testing.assert_close(explanation.weights.sum(), torch.tensor(1.0))
    assert explanation.answer == model.answer([image], [question])[0]
    png = save_explanation(explanation, image, tmp_path / "out" / "map.png")
    with Image.open(png) as written:
        assert written.format == "PNG" and written.size[0] > 100


def test_cli_explain_and_predict_explain_write_the_overlay(tmp_path):
    torch.manual_seed(0)
    model = DualHeadVQA(tiny_model_config(fusion="cross_attention"), VOCAB)
    model.save_pretrained(tmp_path / "model")
    image = tmp_path / "shape.png"
    draw_shape(image, "square", "blue")
    runner = CliRunner()
    result = runner.invoke(main, ["explain", str(tmp_path / "model"), "--image", str(image),
                                  "--question", "What shape is it?", "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    assert "answer:" in result.output and "attention map over" in result.output and (tmp_path / "a.png").is_file()
    result = runner.invoke(main, ["predict", str(tmp_path / "model"), "--image", str(image),
                                  "--question", "Is it blue?", "--explain", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b.png").is_file()
