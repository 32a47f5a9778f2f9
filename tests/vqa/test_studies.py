"""`dualhead ablate` / `compare` and what they stand on: single-task data, staged LR schedule, reports."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from dualhead.cli import main
from dualhead.core.config import ConfigError, load_config, save_config, with_overrides
from dualhead.core.trainer import Trainer, staged_cosine
from dualhead.vqa import studies
from dualhead.vqa.data import load_splits
from dualhead.vqa.studies import ABLATION, COMPARISON, combine_task_models, encoder_weights, head_accuracies
from tests.conftest import tiny_run_config


def test_data_tasks_keeps_one_tasks_questions_in_every_split(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path)
    everything = load_splits(config.data)
    only_binary = load_splits(with_overrides(config, ["data.tasks=[binary]"]).data)
    for name in ("train", "val", "test"):
        expected = [r for r in everything.split(name) if r.task == "binary"]
        assert only_binary.split(name) == expected and expected
    with pytest.raises(ValueError, match="data.tasks=.*choose one or more of binary, open"):
        load_splits(with_overrides(config, ["data.tasks=[yesno]"]).data)


def test_with_overrides_checks_keys_against_the_tree(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path)
    assert with_overrides(config, ["model.fusion=concat"]).model.fusion == "concat"
    assert config.model.fusion == "attention"  # a copy: the original is unchanged
    with pytest.raises(ConfigError, match="no_such_key"):
        with_overrides(config, ["model.no_such_key=1"])


def test_staged_cosine_restarts_at_the_boundary_with_its_own_scale():
    one = staged_cosine(0, 100, 0.1)
    assert one(0) == 0.0 and one(10) == pytest.approx(1.0) and one(55) == pytest.approx(0.5) and one(100) == pytest.approx(0.0)
    two = staged_cosine(60, 100, 0.1, second_stage_scale=0.1)
    assert two(6) == pytest.approx(1.0) and two(59) < 0.01  # first stage: warm-up of 6 steps, decays to ~0
    assert two(60) == 0.0 and two(64) == pytest.approx(0.1)  # second stage: warm-up of 4 steps to 0.1
    assert two(82) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 18 / 36)))


def test_restart_schedule_runs_new_layers_at_finetune_lr_after_the_warm_up(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, epochs=3, frozen_warmup_epochs=1, finetune_schedule="restart",
                             finetune_lr=1e-4, lr=1e-2, encoder_lr=1e-3, warmup_fraction=0.0)
    trainer = Trainer(config, tmp_path / "run")
    steps_per_epoch = trainer._steps_in_epochs(1)
    groups = trainer.optimizer.param_groups
    lr_at = {g["role"]: g["initial_lr"] * factor(steps_per_epoch) for g, factor in zip(groups, trainer.scheduler.lr_lambdas, strict=True)}
    assert lr_at["new"] == pytest.approx(1e-4) and lr_at["pretrained"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="finetune_schedule"):
        Trainer(with_overrides(config, ["train.finetune_schedule=sometimes"]), tmp_path / "bad")


def test_combine_task_models_weights_each_model_by_its_questions():
    binary = {"test": {"binary_count": 30, "oracle_binary_accuracy": 0.8}, "parameters": 10, "wall_seconds": 5.0, "latency_ms": 10.0,
              "frozen_epoch_seconds": 1.0, "finetune_epoch_seconds": None}
    open_ = {"test": {"open_count": 10, "oracle_open_accuracy": 0.4}, "parameters": 12, "wall_seconds": 7.0, "latency_ms": 20.0,
             "frozen_epoch_seconds": 2.0, "finetune_epoch_seconds": None}
    combined = combine_task_models(binary, open_)
    assert combined["accuracy"] == {"overall": pytest.approx(0.7), "binary": 0.8, "open": 0.4, "routed_overall": None}
    assert combined["parameters"] == 22 and combined["wall_seconds"] == 12.0 and combined["frozen_epoch_seconds"] == 3.0
    assert combined["latency_ms"] == pytest.approx(12.5) and combined["finetune_epoch_seconds"] is None


def test_head_accuracies_use_the_true_question_type_and_keep_the_routed_figure():
    test = {"oracle_accuracy": 0.7, "oracle_binary_accuracy": 0.8, "oracle_open_accuracy": 0.6, "accuracy": 0.69, "router_accuracy": 0.98}
    assert head_accuracies(test) == {"overall": 0.7, "binary": 0.8, "open": 0.6, "routed_overall": 0.69}
    assert head_accuracies({**test, "router_accuracy": None})["routed_overall"] is None


def test_variants_are_valid_configs_and_say_where_weights_come_from():
    base = load_config("vqa_rad")
    for variant in {v.name: v for v in (*ABLATION, *COMPARISON)}.values():
        with_overrides(base, list(variant.overrides))
    assert [v.name for v in ABLATION] == ["full", "separate", "concat_fusion", "frozen_encoders", "single_head"]
    assert encoder_weights(base) == "efficientnet_lite0: ImageNet; minilm: pretrained"
    vit = with_overrides(base, list(next(v for v in COMPARISON if v.name == "vit_bert").overrides))
    assert encoder_weights(vit) == "vit_base_patch16_224: random init; bert-base: random init"


@pytest.mark.slow
def test_ablate_runs_all_five_rows_end_to_end_and_resumes_without_retraining(shapes_root, tmp_path, monkeypatch):
    config_file = tmp_path / "tiny.yaml"
    save_config(tiny_run_config(shapes_root, tmp_path / "runs", epochs=2, frozen_warmup_epochs=1), config_file)
    out = tmp_path / "ablation"
    fits = []
    real_fit = Trainer.fit

    def counting_fit(self):
        fits.append(self.run_dir)
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", counting_fit)
    result = CliRunner().invoke(main, ["ablate", str(config_file), "--seeds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(fits) == 12  # 5 configurations x 2 seeds, separate models train two runs each

    report = json.loads((out / "ablation.json").read_text())
    assert [row["name"] for row in report["rows"]] == [v.name for v in ABLATION]
    for row in report["rows"]:
        for metric in ("overall", "binary", "open"):
            stat = row["accuracy"][metric]
            assert 0.0 <= stat["mean"] <= 1.0 and stat["std"] >= 0.0
        assert row["parameters"] > 0 and row["wall_minutes"] > 0 and row["latency_ms"] > 0 and len(row["per_seed"]) == 2
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["separate"]["accuracy"]["routed_overall"]["mean"] is None  # a pair of single-task models: oracle routing only
    assert rows["separate"]["parameters"] > rows["full"]["parameters"]
    assert rows["frozen_encoders"]["finetune_epoch_seconds"] is None and rows["full"]["finetune_epoch_seconds"] > 0
    table = (out / "ablation.md").read_text()
    assert all(variant.label in table for variant in ABLATION) and "67 / 83 / 62" in table
    assert (out / "ablation.png").stat().st_size > 0
    assert (out / "separate" / "seed0" / "binary" / "result.json").is_file()

    # A second run reads finished rows back; one whose result was lost resumes from its checkpoint.
    (out / "single_head" / "seed1" / "result.json").unlink()
    fits.clear()
    again = CliRunner().invoke(main, ["ablate", str(config_file), "--seeds", "2", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert fits == [out / "single_head" / "seed1"]
    assert json.loads((out / "ablation.json").read_text())["rows"][0]["accuracy"] == report["rows"][0]["accuracy"]


def test_a_study_directory_holding_another_configuration_is_an_error(shapes_root, tmp_path):
    config = tiny_run_config(shapes_root, tmp_path, epochs=1)
    run_dir = tmp_path / "study" / "full" / "seed0"
    run_dir.mkdir(parents=True)
    save_config(with_overrides(config, ["train.epochs=5"]), run_dir / "config.yaml")
    with pytest.raises(ValueError, match="holds a run of a different configuration"):
        studies.run_study("ablation", config, [0], tmp_path / "study", only=["full"])
    with pytest.raises(ValueError, match="unknown ablation variant"):
        studies.run_study("ablation", config, [0], tmp_path / "study", only=["everything"])


def test_a_model_without_open_answers_routes_every_question_to_the_binary_head():
    import torch

    from dualhead.vqa.data import AnswerVocab
    from dualhead.vqa.metrics import HeadProbabilities, route_to_binary

    probs = HeadProbabilities(binary=torch.tensor([[0.6, 0.4]] * 3), open=torch.ones(3, 1), router=None)
    assert route_to_binary(probs, AnswerVocab([])).all()
    assert not route_to_binary(probs, AnswerVocab(["a"])).any()  # no router: the more confident head
