"""Task towers over the shared encoders (`model.towers`): one fusion per head, separate or cross-stitched."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dualhead.core.trainer import Trainer
from dualhead.vqa.config import ExpertsConfig
from dualhead.vqa.data.answers import AnswerVocab
from dualhead.vqa.data.batching import VQACollator
from dualhead.vqa.data.records import BINARY, OPEN
from dualhead.vqa.model import DualHeadVQA
from dualhead.vqa.params import format_parameter_table
from tests.conftest import tiny_model_config, tiny_run_config

VOCAB = AnswerVocab(["red", "blue", "circle", "rectangle"])
QUESTIONS = ["is there a circle?", "what color is the shape?", "what shape is it?"]


def build(towers: str, **changes) -> DualHeadVQA:
    torch.manual_seed(0)
    return DualHeadVQA(tiny_model_config(towers=towers, **changes), VOCAB)


def run(model: DualHeadVQA, pixels: torch.Tensor | None = None):
    tokens = model.text.tokenize(QUESTIONS)
    pixels = torch.randn(len(QUESTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(1)) if pixels is None else pixels
    return model(pixel_values=pixels, **tokens)


@pytest.mark.parametrize("towers", ["separate", "cross_stitch"])
def test_each_head_reads_its_own_tower_and_what_is_shared_is_declared(towers):
    model = build(towers)
    output = run(model)
    d = model.config.hidden_dim
    assert output.binary_logits.shape == (3, 2) and output.open_logits.shape == (3, len(VOCAB.open_answers))
    assert output.fused.shape == (3, 2 * d) and model.fusion is None and set(model.task_fusions) == {BINARY, OPEN}
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in [*model.vision.parameters(), *model.text.parameters()])
    assert not any(id(p) in shared for p in model.task_fusions.parameters())
    assert (model.stitch is not None) == (towers == "cross_stitch")
    if model.stitch is not None:
        assert id(model.stitch.alpha) in shared
        assert torch.allclose(model.stitch.alpha[:, :, 0], torch.tensor([[0.9, 0.1], [0.1, 0.9]]))


@pytest.mark.parametrize("towers", ["separate", "cross_stitch"])
def test_the_binary_loss_reaches_the_open_tower_only_through_the_stitch(towers):
    model = build(towers).train()
    run(model).binary_logits.sum().backward()
    binary_tower = [p.grad for p in model.task_fusions[BINARY].parameters()]
    open_tower = [p.grad for p in model.task_fusions[OPEN].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in binary_tower)
    reached = any(g is not None and g.abs().sum() > 0 for g in open_tower)
    assert reached == (towers == "cross_stitch")
    assert all(p.grad is None for p in model.open_head.parameters())
    if towers == "cross_stitch":
        assert model.stitch.alpha.grad is not None and model.stitch.alpha.grad.abs().sum() > 0


def test_shared_towers_are_the_default_and_unchanged():
    model = build("shared")
    assert model.task_fusions is None and model.stitch is None and model.fusion is not None
    assert not any(name.startswith(("task_fusions", "stitch")) for name in model.state_dict())
    assert run(model).fused.shape == (3, model.config.hidden_dim)


@pytest.mark.parametrize("towers", ["separate", "cross_stitch"])
def test_save_and_load_give_identical_outputs(towers, tmp_path):
    model = build(towers).eval()
    with torch.no_grad():  # move the stitch off its start so that loading it is checked
        if model.stitch is not None:
            model.stitch.alpha.uniform_(0, 1)
    model.save_pretrained(tmp_path / "saved")
    loaded = DualHeadVQA.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.towers == towers
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = run(model, pixels), run(loaded, pixels)
    for name in ("binary_logits", "open_logits", "router_logits", "fused"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_cross_attention_towers_attend_over_the_regions_with_weights_summing_to_one():
    model = build("cross_stitch", fusion="cross_attention").eval()
    with torch.no_grad():
        attention = run(model).attention
    regions = model.vision.region_grid[0] * model.vision.region_grid[1]
    assert attention.shape == (3, regions)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3))


def test_bad_tower_settings_are_clear_errors():
    with pytest.raises(ValueError, match="model.towers must be one of shared, separate, cross_stitch"):
        build("stitched")
    with pytest.raises(ValueError, match="does not combine with model.single_head"):
        build("separate", single_head=True)
    with pytest.raises(ValueError, match="model.experts"):
        build("cross_stitch", experts=ExpertsConfig(route="learned", count=2))
    with pytest.raises(ValueError, match=r"model.stitch_self_weight must be in \[0, 1\], got 1.5"):
        build("cross_stitch", stitch_self_weight=1.5)


def test_parameter_table_names_the_towers_and_the_stitch():
    table = format_parameter_table(build("cross_stitch"))
    assert "Fusion per head (task towers)" in table and "Cross-stitch unit between the towers" in table
    assert "Task-specific (towers, heads, router)" in table


@pytest.mark.parametrize("balancer", ["pcgrad", "fixed"])
def test_cross_stitch_towers_train_with_a_gradient_method_and_a_task_absent_from_a_batch(
    balancer, shapes_root, tmp_path
):
    config = tiny_run_config(shapes_root, tmp_path, epochs=2, frozen_warmup_epochs=1, balancer=balancer)
    config.model = dataclasses.replace(config.model, towers="cross_stitch")
    trainer = Trainer(config, tmp_path / "run")
    model = trainer.model
    start = model.stitch.alpha.detach().clone()
    collate = VQACollator(model.vocab, trainer.experiment.store, model.text.tokenize)
    only_open = [r for r in trainer.experiment.splits.train if r.task == OPEN][:8]
    result = trainer.train_step(collate(only_open))  # no yes/no question in this batch
    assert set(result.losses) >= {OPEN} and BINARY not in result.losses
    results = trainer.fit()
    assert not torch.equal(model.stitch.alpha.detach(), start), "the cross-stitch unit did not train"
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert saved["model"]["towers"] == "cross_stitch"
