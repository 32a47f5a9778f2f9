"""The scenes application: configs, experiment building, and training end to end with the core Trainer."""

from __future__ import annotations

import json

import pytest
import torch

from dualhead.core.applications import get_application
from dualhead.core.config import ConfigError, load_config
from dualhead.core.trainer import Trainer
from dualhead.dense.application import APPLICATION, DenseExperiment, ScenesRunConfig, build_experiment
from dualhead.dense.data import ScenesDataset
from dualhead.dense.models import HardSharingFPN
from dualhead.dense.scenes import SceneSpec, render_split
from tests.dense.conftest import DATA_CONFIG, tiny_dense_config


def test_application_is_installed_and_bundled_configs_load():
    assert get_application("scenes") is APPLICATION
    config = load_config("scenes")
    assert isinstance(config, ScenesRunConfig)
    assert config.model.backbone.name == "efficientnet_lite0" and config.model.backbone.weights == "offline"
    assert config.data.format == "scenes" and config.data.num_classes == 6
    resnet = load_config("scenes_resnet50", ["train.epochs=1"])
    assert resnet.model.backbone.name == "resnet50" and resnet.model.backbone.weights == "none"
    assert resnet.train.epochs == 1
    with pytest.raises(ConfigError):
        load_config("scenes", ["data.no_such_field=1"])


def test_experiment_tasks_follow_data_tasks(scenes_cache, tmp_path):
    experiment = build_experiment(tiny_dense_config(scenes_cache, tmp_path))
    assert experiment.task_names == ["seg", "depth", "normals"]
    assert experiment.model.representation_shared_by_tasks
    single = build_experiment(tiny_dense_config(scenes_cache, tmp_path, tasks=["depth"]))
    assert single.task_names == ["depth"] and list(single.model.heads) == ["depth"]
    assert set(single.metric_directions) == {"loss", "depth/abs_err", "depth/rel_err"}
    with pytest.raises(ValueError, match="unknown dense task 'edges'"):
        build_experiment(tiny_dense_config(scenes_cache, tmp_path, tasks=["seg", "edges"]))
    with pytest.raises(ValueError, match="distinct"):
        build_experiment(tiny_dense_config(scenes_cache, tmp_path, tasks=["seg", "seg"]))


def test_loaders_cover_the_splits(scenes_cache, tmp_path):
    experiment = build_experiment(tiny_dense_config(scenes_cache, tmp_path, val_size=0))
    assert experiment.has_split("train") and experiment.has_split("test") and not experiment.has_split("val")
    sizes = [len(batch) for batch in experiment.eval_loader("test")]
    assert sum(sizes) == 8
    experiment.train_sampler.set_epoch(1, skip=1)
    assert len(list(experiment.train_loader())) == experiment.train_sampler.epoch_length - 1
    with pytest.raises(ValueError, match="no 'val' split"):
        experiment.eval_loader("val")


def test_evaluate_reports_every_tasks_metrics(scenes_cache, tmp_path):
    experiment = build_experiment(tiny_dense_config(scenes_cache, tmp_path))
    assert isinstance(experiment, DenseExperiment)
    metrics = experiment.evaluate("val")
    assert set(metrics) == set(experiment.metric_directions) | {f"{t}/loss" for t in experiment.task_names}
    assert metrics["loss"] == pytest.approx(sum(metrics[f"{t}/loss"] for t in experiment.task_names) / 3)
    assert 0 <= metrics["seg/pixel_acc"] <= 1 and metrics["depth/abs_err"] > 0


def test_trainer_fits_the_scenes_application_end_to_end(scenes_cache, tmp_path):
    config = tiny_dense_config(scenes_cache, tmp_path)
    run_dir = tmp_path / "run"
    results = Trainer(config, run_dir).fit()
    assert set(results["test"]) >= {"seg/miou", "depth/abs_err", "normals/mean_angle", "loss"}
    assert all(torch.isfinite(torch.tensor(v)) for v in results["test"].values())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if row["kind"] == "epoch"]
    assert [row["epoch"] for row in epochs] == [1, 2] and all("val/normals/mean_angle" in row for row in epochs)
    # Gradient conflict is measured between every pair of tasks at the shared feature map.
    diagnostics = [row for row in rows if row["kind"] == "diagnostics"]
    assert diagnostics and {"cosine/seg~depth", "cosine/seg~normals", "cosine/depth~normals"} <= set(diagnostics[0])
    model = HardSharingFPN.from_pretrained(run_dir / "best")
    assert list(model.heads) == ["seg", "depth", "normals"]
    reloaded = load_config(run_dir / "config.yaml")
    assert isinstance(reloaded, ScenesRunConfig) and reloaded.data.image_size == 32


def test_gradient_methods_act_on_the_shared_feature_map(scenes_cache, tmp_path):
    """Dense tasks label the same pixels, so a Jacobian at the FPN features is allowed and used."""
    config = tiny_dense_config(scenes_cache, tmp_path)
    config.train.balancer = "upgrad"
    config.train.balancer_options = {"mode": "representation"}
    config.train.max_steps = 2
    trainer = Trainer(config, tmp_path / "upgrad")
    before = [p.detach().clone() for p in trainer.model.shared_parameters()]
    results = trainer.fit()
    assert torch.isfinite(torch.tensor(results["test"]["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.shared_parameters(), strict=True))


def test_build_experiment_takes_ready_splits(tmp_path):
    """Datasets built elsewhere (a notebook, a test) replace loading the format: nothing is cached."""
    spec = SceneSpec(image_size=16)
    splits = {"train": ScenesDataset(render_split(spec, "train", 6), ["seg"], DATA_CONFIG)}
    config = tiny_dense_config(tmp_path / "cache", tmp_path, tasks=["seg"])
    experiment = build_experiment(config, splits=splits)
    assert experiment.datasets["train"] is splits["train"] and not experiment.has_split("val")
    assert not (tmp_path / "cache").exists()
