"""The routing (``moe``) and hypernetwork-head (``hypernet``) architectures beyond the shared contracts
of test_architectures.py: gates, top-k routing, generated weights per task, options and their errors."""

from __future__ import annotations

import pytest
import torch

from dualhead.core.config import load_config
from dualhead.dense.config import HyperNetConfig, MoEConfig
from dualhead.mtl.architectures import ConvHyperNetwork, MultiGateExperts
from tests.dense.test_models import HEADS, tiny_model


def test_each_task_mixes_the_shared_experts_through_its_own_gate():
    model = tiny_model("moe", moe=MoEConfig(experts=3, hidden=8)).eval()
    assert len(model.experts.experts) == 3 and set(model.experts.gates) == set(HEADS)
    with torch.no_grad():
        model.experts.gates["seg"].linear.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # seg prefers expert 0
        model(torch.randn(2, 3, 32, 32))
    usage = model.gate_usage
    assert set(usage) == set(HEADS) and all(len(weights) == 3 for weights in usage.values())
    assert all(sum(weights) == pytest.approx(1.0) for weights in usage.values())
    assert usage["seg"][0] > 0.9 and usage["depth"][0] == pytest.approx(1 / 3, abs=0.05)


def test_top_k_routes_each_sample_to_k_experts_and_the_others_get_no_gradient():
    experts = MultiGateExperts(8, 4, ["a", "b"], experts=4, top_k=1)
    with torch.no_grad():
        experts.gates["a"].linear.bias.copy_(torch.tensor([0.0, 0.0, 9.0, 0.0]))
    features = torch.randn(3, 8, 5, 5)
    weights = experts.gates["a"](features)
    assert ((weights > 0).sum(dim=1) == 1).all() and (weights[:, 2] == 1).all()
    experts(features)["a"].sum().backward()
    touched = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters()) for e in experts.experts]
    assert touched == [False, False, True, False]


def test_hypernetwork_generates_each_task_its_own_output_layer():
    hyper = ConvHyperNetwork(8, {"seg": 6, "depth": 1}, embedding_dim=4, hidden=16)
    seg_weight, seg_bias = hyper("seg")
    depth_weight, depth_bias = hyper("depth")
    assert seg_weight.shape == (6, 8, 1, 1) and seg_bias.shape == (6,)
    assert depth_weight.shape == (1, 8, 1, 1) and depth_bias.shape == (1,)
    assert not torch.allclose(seg_weight[:1], depth_weight)  # different embeddings, different layers
    # The generated layer starts near an ordinary conv initialisation (|w| <= 1/sqrt(in_channels)).
    assert seg_weight.abs().max() < 1.5 / 8**0.5
    depth_weight.sum().backward()
    assert hyper.embeddings["seg"].vector.grad is None and hyper.embeddings["depth"].vector.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown task 'normals'; this hypernetwork generates seg, depth"):
        hyper("normals")


def test_hypernet_heads_keep_the_task_prior():
    """The depth head's prior bias (softplus(2) ~ 2.1 m) holds at initialisation, as for DenseHead."""
    model = tiny_model("hypernet").eval()
    with torch.no_grad():
        depth = model(torch.randn(2, 3, 32, 32)).predictions["depth"]
    assert 1.0 < float(depth.mean()) < 3.5


def test_routing_options_load_from_yaml_overrides_and_are_checked():
    config = load_config(
        "scenes", ["model.architecture=moe", "model.moe.experts=2", "model.moe.top_k=1", "model.hypernet.hidden=8"]
    )
    assert config.model.moe == MoEConfig(experts=2, hidden=64, top_k=1) and config.model.hypernet.hidden == 8
    assert load_config("scenes").model.moe == MoEConfig()  # existing configs stay valid
    with pytest.raises(ValueError, match=r"model.moe: top_k must be in 1..2 \(the number of experts\) or null, got 3"):
        tiny_model("moe", moe=MoEConfig(experts=2, top_k=3))
    with pytest.raises(ValueError, match="model.moe: a mixture of experts needs at least one expert, got 0"):
        tiny_model("moe", moe=MoEConfig(experts=0))
    with pytest.raises(ValueError, match="model.hypernet: embedding_dim and hidden must be >= 1, got 0 and 64"):
        tiny_model("hypernet", hypernet=HyperNetConfig(embedding_dim=0))
