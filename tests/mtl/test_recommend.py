"""`dualhead recommend`: the probe's measurements, the affinity's sign on constructed tasks, every branch
of the decision tree, the cost table, and the command on a dense and a VQA config."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dualhead.cli import main
from dualhead.core.config import RunConfig, save_config
from dualhead.core.experiment import Experiment
from dualhead.core.model import MultiTaskModel, TaskOutputs
from dualhead.core.task import Task
from dualhead.core.trainer import Trainer
from dualhead.dense.models import DENSE_ARCHITECTURES
from dualhead.dense.sampler import ShuffledBatchSampler
from dualhead.mtl.recommend import (
    ADAPTERS_OR_ROUTING,
    HARD_SHARING,
    MULTI_DECODER,
    SOFT_SHARING,
    architecture_candidates,
    decide,
    probe,
    probe_config,
    recommend,
)
from tests.conftest import tiny_run_config, write_shapes_dataset
from tests.dense.conftest import tiny_dense_config


class Regression(Task):
    """Mean squared error to `sign` times the sum of the inputs."""

    metrics = {"mse": False}
    primary_metric = "mse"

    def __init__(self, name: str, sign: float):
        super().__init__()
        self.name = name
        self.sign = sign

    def loss(self, prediction: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return (prediction.squeeze(1) - self.sign * batch.sum(dim=1)).square().mean()


class TwoHeads(MultiTaskModel):
    """A shared layer and one linear head per task, the heads starting from the same weights."""

    def __init__(self, tasks: list[str]):
        super().__init__()
        self.shared = nn.Linear(4, 16)
        head = nn.Linear(16, 1)
        self.heads = nn.ModuleDict({task: nn.Linear(16, 1) for task in tasks})
        for module in self.heads.values():
            module.load_state_dict(head.state_dict())

    def forward(self, x: torch.Tensor) -> TaskOutputs:
        features = torch.tanh(self.shared(x))
        return TaskOutputs({task: head(features) for task, head in self.heads.items()}, {"features": features})

    def shared_modules(self) -> list[nn.Module]:
        return [self.shared]


class ToyExperiment(Experiment):
    """Two regression tasks on random inputs: with signs (1, 1) they are one task twice, with (1, -1)
    they pull the shared layer in opposite directions."""

    def __init__(self, config: RunConfig, signs: tuple[float, float]):
        tasks = [Regression("a", signs[0]), Regression("b", signs[1])]
        super().__init__(config, TwoHeads([t.name for t in tasks]), tasks)
        self.inputs = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        self._sampler = ShuffledBatchSampler(len(self.inputs), 16)

    @property
    def train_sampler(self) -> ShuffledBatchSampler:
        return self._sampler

    def train_loader(self) -> list[torch.Tensor]:
        return [self.inputs[indices] for indices in self._sampler]


def toy_trainer(tmp_path: Path, signs: tuple[float, float]) -> Trainer:
    config = RunConfig(output_dir=str(tmp_path))
    config.train.precision = "fp32"
    config.train.diagnostics_every_steps = None
    config.train.progress = False
    return Trainer(config, tmp_path / "toy", ToyExperiment(config, signs))


def test_affinity_is_positive_for_identical_tasks_and_negative_for_conflicting_ones(tmp_path):
    same = probe(toy_trainer(tmp_path, (1.0, 1.0)), steps=3, lookahead_lr=0.05).summary()
    assert same["measured_steps"] == 3
    assert same["affinity_mean"]["a->b"] > 0 and same["affinity_mean"]["b->a"] > 0
    assert same["cosine_mean"]["a~b"] == pytest.approx(1.0, abs=1e-5)
    assert same["grad_norm_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert decide(same).family == HARD_SHARING

    opposed = probe(toy_trainer(tmp_path, (1.0, -1.0)), steps=3, lookahead_lr=0.05).summary()
    assert opposed["affinity_mean"]["a->b"] < 0 and opposed["affinity_mean"]["b->a"] < 0
    assert opposed["cosine_mean"]["a~b"] < -0.5 and opposed["cosine_negative_fraction"]["a~b"] == 1.0
    decision = decide(opposed)
    assert decision.family == SOFT_SHARING and any("a<->b" in reason for reason in decision.reasons)


def test_the_probe_leaves_no_trace_of_its_lookahead_steps(tmp_path):
    """The lookahead restores parameters and buffers: the probe trains exactly as the plain loop."""
    torch.manual_seed(0)
    probed = toy_trainer(tmp_path, (1.0, -1.0))
    probe(probed, steps=4, lookahead_lr=0.5)
    torch.manual_seed(0)
    plain = toy_trainer(tmp_path, (1.0, -1.0))
    plain.experiment.on_epoch_start(0)
    for batch in itertools.islice(plain.experiment.train_loader(), 4):
        plain.train_step(batch)
    for a, b in zip(probed.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def summary(cosine: float, negative: float, affinity: tuple[float, float], ratio: float = 1.0, structures=None):
    return {
        "cosine_mean": {"a~b": cosine},
        "cosine_negative_fraction": {"a~b": negative},
        "affinity_mean": {"a->b": affinity[0], "b->a": affinity[1]},
        "grad_norm_ratio": ratio,
        "structures": structures or {"a": [8, 8], "b": [8, 8]},
    }


def test_every_branch_of_the_decision_tree():
    similar = decide(summary(0.5, 0.0, (1e-3, 2e-3)))
    assert (similar.family, similar.branch) == (HARD_SHARING, "tasks similar") and not similar.advice
    loose = decide(summary(0.05, 0.2, (1e-3, 2e-3)))
    assert loose.family == ADAPTERS_OR_ROUTING and "a~b: mean cosine +0.050 < 0.2" in loose.reasons[0]
    one_way = decide(summary(0.3, 0.1, (1e-3, -2e-3)))  # harm in one direction only: loosely related
    assert one_way.family == ADAPTERS_OR_ROUTING and "b->a: affinity -2.00e-03 <= 0" in one_way.reasons[0]
    conflict = decide(summary(-0.1, 0.6, (1e-3, 2e-3)))
    assert conflict.family == SOFT_SHARING and "negative in 60% of steps" in conflict.reasons[0]
    structure = decide(summary(0.5, 0.0, (1e-3, 1e-3), structures={"a": [8, 8], "b": [5]}))
    assert structure.family == MULTI_DECODER and "b [5]" in structure.reasons[0]
    limited = decide(summary(-0.1, 0.9, (-1e-3, -1e-3)), limited_compute=True)
    assert limited.family == HARD_SHARING and limited.branch == "limited compute"
    dominated = decide(summary(0.5, 0.0, (1e-3, 1e-3), ratio=25.0))
    assert dominated.advice and "25.0" in dominated.advice[0]


@pytest.fixture(scope="module")
def scenes_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scenes")


def test_recommend_on_tiny_scenes_measures_every_architecture(scenes_cache, tmp_path):
    config = tiny_dense_config(scenes_cache, tmp_path)
    config.model.architecture = "mtan"  # the probe trains hard sharing whatever the config says
    probe_run, candidates = architecture_candidates(config, sorted(DENSE_ARCHITECTURES), "hard_fpn")
    assert probe_run.model.architecture == "hard_fpn" and config.model.architecture == "mtan"
    result = recommend(probe_run, candidates, steps=3, cost_steps=1)
    measured = result["probe"]
    assert measured["measured_steps"] == 3
    assert set(measured["cosine_mean"]) == {"seg~depth", "seg~normals", "depth~normals"}
    assert len(measured["affinity_mean"]) == 6
    numbers = [*measured["cosine_mean"].values(), *measured["affinity_mean"].values(), measured["grad_norm_ratio"]]
    assert all(math.isfinite(v) for v in numbers) and measured["grad_norm_ratio"] >= 1.0
    assert all(-1.0 <= v <= 1.0 for v in measured["cosine_mean"].values())
    rows = {row["architecture"]: row for row in result["candidates"]}
    assert set(rows) == set(DENSE_ARCHITECTURES)
    assert all(row["parameters"] > 0 and row["step_seconds"] > 0 for row in rows.values())
    assert rows["hard_fpn"]["step_time_ratio"] == 1.0
    assert rows["cross_stitch"]["parameters"] > rows["hard_fpn"]["parameters"]  # a backbone per task
    family = result["decision"]["family"]
    assert result["recommended"] and all(family in rows[name]["families"] for name in result["recommended"])


def test_probe_config_is_float32_without_logged_diagnostics(scenes_cache, tmp_path):
    config = tiny_dense_config(scenes_cache, tmp_path)
    config.train.precision = "bf16"
    probed = probe_config(config)
    assert probed.train.precision == "fp32" and probed.train.diagnostics_every_steps is None
    assert config.train.precision == "bf16"  # the user's config is left as it was


def test_recommend_needs_two_tasks(scenes_cache, tmp_path):
    config = tiny_dense_config(scenes_cache, tmp_path, tasks=["seg"])
    with pytest.raises(ValueError, match="needs two tasks or more"):
        probe(Trainer(probe_config(config), tmp_path / "probe"), steps=1)


def test_recommend_command_on_scenes_and_vqa(scenes_cache, tmp_path):
    scenes = tiny_dense_config(scenes_cache, tmp_path)
    save_config(scenes, tmp_path / "scenes.yaml")
    out = tmp_path / "scenes.json"
    result = CliRunner().invoke(
        main, ["recommend", str(tmp_path / "scenes.yaml"), "model.fpn_dim=8", "--steps", "2", "--cost-steps", "1",
               "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "## Decision:" in result.output and "| moe |" in result.output and "| hypernet |" in result.output
    written = json.loads(out.read_text())
    assert written["probe"]["steps"] == 2 and written["config"].endswith("model.fpn_dim=8")

    root = write_shapes_dataset(tmp_path / "shapes", {"train": 12, "val": 3, "test": 3})
    save_config(tiny_run_config(root, tmp_path), tmp_path / "vqa.yaml")
    out = tmp_path / "vqa.json"
    result = CliRunner().invoke(
        main, ["recommend", str(tmp_path / "vqa.yaml"), "--steps", "2", "--cost-steps", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "binary~open" in result.output
    rows = {row["architecture"]: row for row in json.loads(out.read_text())["candidates"]}
    assert rows["vqa (as configured)"]["step_seconds"] > 0
    assert "does not apply: the vqa model has no model.architecture option" in rows["moe"]["note"]
    assert "step_seconds" not in rows["moe"]


def test_recommend_command_errors_are_one_line(tmp_path, scenes_cache):
    config = tiny_dense_config(scenes_cache, tmp_path, tasks=["depth"])
    save_config(config, tmp_path / "one.yaml")
    result = CliRunner().invoke(main, ["recommend", str(tmp_path / "one.yaml"), "--steps", "1"])
    assert result.exit_code != 0 and "needs two tasks or more" in result.output
