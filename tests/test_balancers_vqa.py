"""Every balancer trains the dual-head model on easy-VQA, including steps where one task is absent."""

from __future__ import annotations

import pytest
import torch

from dualhead.config import DataConfig, TrainConfig
from dualhead.mtl.balancers import BALANCERS, build_balancer
from dualhead.train.features import model_inputs
from dualhead.vqa.data import AnswerVocab, ImageStore, load_splits
from dualhead.vqa.data.batching import VQACollator
from dualhead.vqa.data.records import BINARY, OPEN
from dualhead.vqa.model import DualHeadVQA
from dualhead.vqa.objective import VQAObjective
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def easy_vqa_setup():
    splits = load_splits(DataConfig(format="easy_vqa"))
    records = splits.train[:600]
    vocab = AnswerVocab.from_records(splits.train)
    binary = [r for r in records if r.task == BINARY][:12]
    open_ = [r for r in records if r.task == OPEN][:12]
    batches = [binary[:6] + open_[:6], open_[6:12], binary[6:12]]  # mixed, open only, binary only
    model = DualHeadVQA(tiny_model_config(), vocab)
    collate = VQACollator(vocab, ImageStore(model.preprocessor), model.text.tokenize)
    objective = VQAObjective(TrainConfig(), vocab, records, single_head=False, soft_targets=False)
    return model.state_dict(), vocab, [collate(b) for b in batches], objective


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_balancer_trains_the_dual_head_model(name, easy_vqa_setup):
    state, vocab, batches, objective = easy_vqa_setup
    torch.manual_seed(0)
    model = DualHeadVQA(tiny_model_config(), vocab)
    model.load_state_dict(state)
    model.train()
    balancer = build_balancer(name, objective.tasks)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if list(balancer.parameters()):
        groups.append({"params": list(balancer.parameters()), "lr": balancer.lr})
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shared = [p for m in (model.vision, model.text, model.fusion) for p in m.parameters()]
    for step, batch in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(**model_inputs(batch))
            losses, router = objective(output, batch)
        assert set(losses) == ({BINARY, OPEN}, {OPEN}, {BINARY})[step]
        report = balancer.backward(losses, shared_params=shared, shared_features=output.fused, extra_loss=0.1 * router, step=step)
        assert torch.isfinite(torch.tensor(report.loss)), name
        assert set(report.weights) == set(losses), (name, report.weights)
        assert all(torch.isfinite(torch.tensor(w)) for w in report.weights.values())
        heads = {BINARY: model.binary_head, OPEN: model.open_head}
        for task in heads.keys() - losses.keys():
            head = heads[task]
            assert all(p.grad is None or not p.grad.any() for p in head.parameters()), f"{name}: absent {task} head got a gradient"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("fusion.") for k in changed) and any(k.startswith("binary_head.") for k in changed)
    assert any(k.startswith("open_head.") for k in changed) and any(k.startswith("vision.") for k in changed)
