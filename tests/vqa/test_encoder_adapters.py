"""Per-task adapters and LoRA inside the VQA encoders (`model.encoder_adapters`): each head reads the
encoders run with its own modules; contract tests as for every architecture."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from dualhead.core.trainer import Trainer
from dualhead.vqa.config import EncoderAdaptersConfig, ExpertsConfig
from dualhead.vqa.data.answers import AnswerVocab
from dualhead.vqa.data.batching import VQACollator
from dualhead.vqa.data.records import BINARY, OPEN
from dualhead.vqa.model import DualHeadVQA
from dualhead.vqa.params import format_parameter_table
from tests.conftest import tiny_model_config, tiny_run_config

VOCAB = AnswerVocab(["red", "blue", "circle", "rectangle"])
QUESTIONS = ["is there a circle?", "what color is the shape?", "what shape is it?"]
KINDS = ["adapters", "lora"]


def build(kind: str, **changes) -> DualHeadVQA:
    torch.manual_seed(0)
    return DualHeadVQA(tiny_model_config(encoder_adapters=EncoderAdaptersConfig(kind=kind, reduction=4), **changes), VOCAB)


def inputs(model: DualHeadVQA, seed: int = 1) -> dict[str, torch.Tensor]:
    pixels = torch.randn(len(QUESTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"pixel_values": pixels, **model.text.tokenize(QUESTIONS)}


def perturb(modules: list[torch.nn.Module]) -> None:
    """Move modules off their identity start, so that what they change is visible."""
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(0.1 * torch.randn_like(param))


def changed(params) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("kind", KINDS)
def test_each_head_reads_the_encoders_with_its_own_modules_and_what_is_shared_is_declared(kind):
    model = build(kind)
    output = model(**inputs(model))
    d = model.config.hidden_dim
    assert output.binary_logits.shape == (3, 2) and output.open_logits.shape == (3, len(VOCAB.open_answers))
    assert output.fused.shape == (3, 2 * d)
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in [*model.vision.parameters(), *model.text.parameters(), *model.fusion.parameters()])
    assert not any(id(p) in shared for p in model.encoder_adapters.parameters())
    for task in (BINARY, OPEN):
        own = {id(p) for module in model.task_modules(task) for p in module.parameters()}
        assert {id(p) for p in model.encoder_adapters.vision.tasks[task].parameters()} <= own
        assert {id(p) for p in model.encoder_adapters.text.tasks[task].parameters()} <= own
        other = OPEN if task == BINARY else BINARY
        assert not own & {id(p) for p in model.encoder_adapters.vision.tasks[other].parameters()}


@pytest.mark.parametrize("kind", KINDS)
def test_modules_start_as_the_identity_so_cached_plain_features_are_exact(kind):
    model = build(kind).eval()
    batch = inputs(model)
    with torch.no_grad():
        live = model(**batch)
        cached = model(
            image_features=model.encode_images(batch["pixel_values"]),
            text_features=model.encode_questions(batch["input_ids"], batch["attention_mask"]),
        )
        torch.testing.assert_close(live.binary_logits, cached.binary_logits)
        torch.testing.assert_close(live.open_logits, cached.open_logits)
        perturb(model.encoder_adapters.task_modules(OPEN))
        moved = model(**batch)
    torch.testing.assert_close(moved.binary_logits, live.binary_logits)  # the binary path has no open modules
    assert not torch.allclose(moved.open_logits, live.open_logits)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frozen_encoders", [False, True])
def test_a_head_s_loss_reaches_its_own_modules_and_the_shared_encoders_only(kind, frozen_encoders):
    model = build(kind).train()
    if frozen_encoders:
        model = build(kind, vision=dataclasses.replace(model.config.vision, freeze=True),
                      text=dataclasses.replace(model.config.text, freeze=True)).train()
    for task in (BINARY, OPEN):  # B = 0 gives a zero gradient: move every module off its start
        perturb(model.encoder_adapters.task_modules(task))
    model(**inputs(model)).binary_logits.sum().backward()
    adapters = model.encoder_adapters
    assert changed(adapters.vision.tasks[BINARY].parameters()) and changed(adapters.text.tasks[BINARY].parameters())
    assert all(p.grad is None for module in adapters.task_modules(OPEN) for p in module.parameters())
    assert all(p.grad is None for p in model.open_head.parameters())
    assert changed(model.vision.parameters()) != frozen_encoders
    assert changed(model.text.parameters()) != frozen_encoders


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_give_identical_outputs(kind, tmp_path):
    model = build(kind).eval()
    perturb([model.encoder_adapters])
    model.save_pretrained(tmp_path / "saved")
    loaded = DualHeadVQA.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.encoder_adapters.kind == kind
    batch = inputs(model)
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    for name in ("binary_logits", "open_logits", "router_logits", "fused"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_adapters_sit_after_every_vision_block_and_transformer_layer():
    model = build("adapters")
    adapters = model.encoder_adapters
    assert len(adapters.text.layer_names) == len(model.text.layers()) == 1
    assert len(adapters.vision.layer_names) >= 6 and all("blocks" in name for name in adapters.vision.layer_names)


def test_parameter_table_names_the_adapters():
    table = format_parameter_table(build("lora"))
    assert "encoder lora per head" in table and "Encoder adapters / LoRA per head" in table
    assert "Task-specific (encoder adapters, heads, router)" in table


def test_bad_adapter_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model.encoder_adapters.kind 'prefix'"):
        build("prefix")
    with pytest.raises(ValueError, match="reduction >= 1"):
        DualHeadVQA(tiny_model_config(encoder_adapters=EncoderAdaptersConfig(kind="adapters", reduction=0)), VOCAB)
    with pytest.raises(ValueError, match="does not combine with model.single_head"):
        build("lora", single_head=True)
    with pytest.raises(ValueError, match="model.experts"):
        build("adapters", experts=ExpertsConfig(route="learned", count=2))


@pytest.mark.parametrize("kind,balancer", [("adapters", "pcgrad"), ("lora", "fixed")])
def test_frozen_encoders_with_adapters_train_after_the_warm_up_with_a_task_absent_from_a_batch(
    kind, balancer, shapes_root, tmp_path
):
    config = tiny_run_config(shapes_root, tmp_path, epochs=2, frozen_warmup_epochs=1, balancer=balancer)
    config.model = dataclasses.replace(
        config.model,
        encoder_adapters=EncoderAdaptersConfig(kind=kind, reduction=4),
        vision=dataclasses.replace(config.model.vision, freeze=True),
        text=dataclasses.replace(config.model.text, freeze=True),
    )
    trainer = Trainer(config, tmp_path / "run")
    model, experiment = trainer.model, trainer.experiment
    start = {k: v.clone() for k, v in model.state_dict().items()}
    stages = []
    enter_stage = experiment.on_epoch_start

    def recording(epoch):
        enter_stage(epoch)
        stages.append((epoch, experiment.stage, experiment.cache is not None))

    experiment.on_epoch_start = recording
    results = trainer.fit()
    assert (0, (True, True, False), True) in stages and (1, (True, True, True), False) in stages
    last = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))  # best/ may be a warm-up epoch
    adapters = [k for k in start if k.startswith("encoder_adapters.")]
    assert adapters and any(not torch.equal(last[k], start[k]) for k in adapters), "the adapters did not train"
    encoders = [k for k in start if k.startswith(("vision.", "text."))]
    assert all(torch.equal(last[k], start[k]) for k in encoders), "frozen encoder weights changed"
    collate = VQACollator(model.vocab, experiment.store, model.text.tokenize)
    only_open = [r for r in experiment.splits.train if r.task == OPEN][:8]
    result = trainer.train_step(collate(only_open))  # no yes/no question in it
    assert set(result.losses) >= {OPEN} and BINARY not in result.losses
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert saved["model"]["encoder_adapters"]["kind"] == kind
