"""Gradient-conflict diagnostics at the shared parameters and their plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dualhead.core.plots import read_metrics
from dualhead.mtl.diagnostics import gradient_conflict, plot_diagnostics


def test_gradient_conflict_norms_cosines_and_graph_kept():
    theta = torch.tensor([1.0, 2.0, -1.0], requires_grad=True)
    features = theta * 2.0
    # d/dtheta: binary (6, 0, 0); open (2, 2, 0); count (-4, 0, 0) — norms 6, 2 sqrt 2, 4.
    losses = {
        "binary": 3 * features[0],
        "open": features[0] + features[1],
        "count": -2 * features[0],
    }
    result = gradient_conflict(losses, [theta])
    assert result == pytest.approx(
        {
            "grad_norm/binary": 6.0,
            "grad_norm/open": 2 * math.sqrt(2),
            "grad_norm/count": 4.0,
            "cosine/binary~open": 1 / math.sqrt(2),
            "cosine/binary~count": -1.0,
            "cosine/open~count": -1 / math.sqrt(2),
        }
    )
    sum(losses.values()).backward()  # the graph survived; d/dtheta = 2 * (3 + 1 - 2, 1, 0)
    assert theta.grad.tolist() == [4.0, 2.0, 0.0]


def test_partial_labels_conflict_only_at_shared_parameters():
    """Each sample labelled for one task: at the per-sample features the task gradients sit on
    disjoint rows (cosine exactly 0); at the shared weights they meet and can conflict."""
    weight = torch.tensor([[1.0, -2.0], [0.5, 1.0]], requires_grad=True)
    inputs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    features = inputs @ weight  # row 0 labelled for task a, row 1 for task b
    losses = {"a": features[0].sum(), "b": -features[1].sum()}
    rows = torch.autograd.grad(losses["a"], features, retain_graph=True)[0].flatten()
    other = torch.autograd.grad(losses["b"], features, retain_graph=True)[0].flatten()
    assert float(rows @ other) == 0.0
    result = gradient_conflict(losses, [weight])
    assert result["cosine/a~b"] == pytest.approx(-math.sqrt(2) / 2)  # (1,1,0,0) vs (-1,-1,-1,-1)


def test_gradient_conflict_zero_gradient_has_zero_cosine_and_frozen_params_are_an_error():
    theta = torch.ones(2, requires_grad=True)
    result = gradient_conflict({"a": theta.sum(), "b": (theta * 0).sum()}, [theta])
    assert result["grad_norm/b"] == 0.0 and result["cosine/a~b"] == 0.0
    with pytest.raises(ValueError, match="frozen"):
        gradient_conflict({"a": theta.sum()}, [torch.ones(2)])


def test_plot_diagnostics_writes_png_from_a_metrics_file_with_a_torn_last_line(tmp_path):
    rows = [
        {"step": s, "loss": 1.0, "grad_norm/binary": 1 / (s + 1), "grad_norm/open": 0.5, "cosine/binary~open": math.cos(s)}
        for s in range(5)
    ]
    rows.insert(2, {"epoch": 0, "val/accuracy": 0.5})  # rows without a step are skipped
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n\n{"step": 9, "grad')
    png = plot_diagnostics(read_metrics(tmp_path), tmp_path / "plots" / "conflict.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_corrupt_metrics_line_is_an_error_naming_it_and_nothing_to_plot_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "grad_norm/a": 1.0}\n{"step": 2,\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not JSON"):
        read_metrics(tmp_path)
    with pytest.raises(ValueError, match="no rows"):
        plot_diagnostics([{"step": 1, "loss": 1.0}], tmp_path / "x.png")
