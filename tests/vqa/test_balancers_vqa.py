"""Every balancer trains the dual-head model through `Trainer.train_step`, including steps where one
task is absent, and gradient methods refuse the representation mode where it cannot show conflict."""

from __future__ import annotations

import pytest
import torch

from dualhead.core.trainer import Trainer
from dualhead.mtl.balancers import BALANCERS
from dualhead.vqa.config import VQARunConfig
from dualhead.vqa.data import VQASplits, load_splits
from dualhead.vqa.data.batching import VQACollator
from dualhead.vqa.data.records import BINARY, OPEN
from dualhead.vqa.experiment import VQAExperiment
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def easy_vqa_records():
    from dualhead.vqa.config import DataConfig

    train = load_splits(DataConfig(format="easy_vqa")).train[:600]
    binary = [r for r in train if r.task == BINARY][:12]
    open_ = [r for r in train if r.task == OPEN][:12]
    return train, [binary[:6] + open_[:6], open_[6:12], binary[6:12]]  # mixed, open only, binary only


def tiny_trainer(records, tmp_path, balancer: str, **options) -> Trainer:
    config = VQARunConfig(model=tiny_model_config())
    config.train.balancer = balancer
    config.train.balancer_options = options
    config.train.progress = False
    config.train.warmup_fraction = 0.0  # the first steps move the weights
    config.train.diagnostics_every_steps = None
    torch.manual_seed(0)
    experiment = VQAExperiment(config, splits=VQASplits(name="easy_vqa", train=records, val=[], test=[]))
    return Trainer(config, tmp_path / balancer, experiment)


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_balancer_trains_the_dual_head_model(name, easy_vqa_records, tmp_path):
    records, batches = easy_vqa_records
    trainer = tiny_trainer(records, tmp_path, name)
    model = trainer.model
    collate = VQACollator(model.vocab, trainer.experiment.store, model.text.tokenize)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = {BINARY: model.binary_head, OPEN: model.open_head}
    for step, batch in enumerate(batches):
        result = trainer.train_step(collate(batch), optimizer_step=False)
        present = ({BINARY, OPEN}, {OPEN}, {BINARY})[step]
        assert set(result.losses) == present | {"aux"}
        assert torch.isfinite(torch.tensor(result.report.loss)), name
        assert set(result.report.weights) == present, (name, result.report.weights)
        assert all(torch.isfinite(torch.tensor(w)) for w in result.report.weights.values())
        for task in heads.keys() - present:
            assert all(p.grad is None or not p.grad.any() for p in heads[task].parameters()), f"{name}: absent {task} head got a gradient"
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("fusion.") for k in changed) and any(k.startswith("binary_head.") for k in changed)
    assert any(k.startswith("open_head.") for k in changed) and any(k.startswith("vision.") for k in changed)


def test_representation_mode_is_refused_for_partial_labels_with_the_reason(easy_vqa_records, tmp_path):
    records, _ = easy_vqa_records
    with pytest.raises(ValueError, match="disjoint rows"):
        tiny_trainer(records, tmp_path, "pcgrad", mode="representation")


def test_conflict_diagnostics_at_shared_parameters_are_not_structurally_zero(easy_vqa_records, tmp_path):
    records, batches = easy_vqa_records
    trainer = tiny_trainer(records, tmp_path, "fixed")
    trainer.config.train.diagnostics_every_steps = 1
    collate = VQACollator(trainer.model.vocab, trainer.experiment.store, trainer.model.text.tokenize)
    diagnostics = trainer.train_step(collate(batches[0])).diagnostics
    assert set(diagnostics) == {"grad_norm/binary", "grad_norm/open", "cosine/binary~open"}
    assert diagnostics["grad_norm/binary"] > 0 and diagnostics["grad_norm/open"] > 0
    assert abs(diagnostics["cosine/binary~open"]) > 1e-4
